"""deploy/dagster.yaml as written: a Dagster instance on a real PostgreSQL server runs the
sl_basic recipe job, and the run, its materializations, their data versions and the `gpu`
pool the training step queued in are rows in PostgreSQL."""

import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from conftest import TINY_RUN_CONFIG, run_job
from local_services import postgres  # noqa: F401  (fixture)
from resources.store.artifact_store import ArtifactStore

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.slow
def test_sl_basic_on_a_postgres_backed_instance(homes, postgres, monkeypatch):  # noqa: F811
    _, dagster_home = homes
    shutil.copy(DEPLOY / "dagster.yaml", dagster_home / "dagster.yaml")
    for k, v in postgres.env().items():
        monkeypatch.setenv(k, v)
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2

    result = run_job("sl_basic", TINY_RUN_CONFIG)
    assert result.success

    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT pipeline_name, status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchall() == [("sl_basic", "SUCCESS")]
        cur.execute("SELECT asset_key, event FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                    (result.run_id,))
        events = {AssetKey.from_db_string(k).to_user_string(): body for k, body in cur.fetchall()}
        # the training step took its slot in the `gpu` pool, whose limit came from dagster.yaml
        cur.execute('SELECT "limit", using_default_limit FROM concurrency_limits WHERE concurrency_key = %s', ("gpu",))
        assert cur.fetchall() == [(1, True)]
    assert set(events) >= {f"sl_basic/{s}" for s in ("dataset", "tokenized", "checkpoint", "eval_report", "registered_model")}
    # the data version Dagster recorded is the stored artifact's content hash
    assert ArtifactStore().latest("sl_basic/checkpoint").content_hash in events["sl_basic/checkpoint"]
