"""Scheduled retraining, the drop-folder sensor and declarative automation: evaluated with
Dagster's schedule/sensor test contexts, and end to end under a real `dagster-daemon`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import (AssetKey, AssetMaterialization, DagsterEventType, DagsterInstance, DefaultScheduleStatus, DefaultSensorStatus,
                     build_schedule_context, build_sensor_context, evaluate_automation_conditions)

from conftest import TINY_RUN_CONFIG, config_for, env_with
from resources.datasets.synthetic import arithmetic_conversations
from crucible_assets.sweeps.assets import SWEEP_STAGES
from crucible_jobs import defs
from crucible_jobs.automation import FOLLOW_UPSTREAM
from recipes import RECIPES
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry

RECIPE_NAMES = [r.name for r in RECIPES]


def write_automation_config(crucible_home: Path, recipe: str, config: dict) -> None:
    (crucible_home / "automation").mkdir(parents=True, exist_ok=True)
    (crucible_home / "automation" / f"{recipe}.yaml").write_text(yaml.safe_dump(config))


def drop(folder: Path, name: str, records: list[dict]) -> Path:
    """Written under a dotfile name and renamed, as a user should, so no half file is seen."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}"
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    return partial.rename(folder / name)


def test_every_recipe_has_a_stopped_schedule_that_runs_its_job_with_the_automation_config(homes):
    crucible_home, _ = homes
    schedules = {s.name: s for s in defs.schedules}
    assert set(schedules) == {f"{r}_retrain" for r in RECIPE_NAMES}
    assert all(s.default_status == DefaultScheduleStatus.STOPPED for s in schedules.values())

    tick = schedules["dpo_retrain"].evaluate_tick(build_schedule_context())
    [request] = tick.run_requests
    assert request.job_name in (None, "dpo") and schedules["dpo_retrain"].job_name == "dpo"
    assert request.run_config == {}  # no automation config: the recipe's defaults

    write_automation_config(crucible_home, "dpo", config_for("dpo", TINY_RUN_CONFIG))
    [request] = schedules["dpo_retrain"].evaluate_tick(build_schedule_context()).run_requests
    assert request.run_config == config_for("dpo", TINY_RUN_CONFIG)
    assert request.tags["crucible/trigger"] == "schedule"

    (crucible_home / "automation" / "dpo.yaml").write_text("ops: [")
    with pytest.raises(Exception) as error:  # Dagster wraps what the schedule raised
        schedules["dpo_retrain"].evaluate_tick(build_schedule_context())
    assert "dpo.yaml: not valid YAML" in str(error.value.__cause__)


def evaluate(sensor, cursor=None, **resources):
    return sensor.evaluate_tick(build_sensor_context(cursor=cursor, resources=resources or None))


def test_drop_folder_sensor_starts_the_recipe_once_per_new_or_changed_file(homes, tmp_path, monkeypatch):
    crucible_home, _ = homes
    sensor = {s.name: s for s in defs.sensors}["chat_sl_drop_folder"]
    assert sensor.default_status == DefaultSensorStatus.STOPPED and sensor.job_name == "chat_sl"

    folder = crucible_home / "drop" / "chat_sl"  # the documented default under $CRUCIBLE_HOME
    empty = evaluate(sensor)
    assert not empty.run_requests and "no new data files" in empty.skip_message

    write_automation_config(crucible_home, "chat_sl", config_for("chat_sl", TINY_RUN_CONFIG))
    first = drop(folder, "week1.jsonl", arithmetic_conversations(20, 1))
    (folder / ".week2.jsonl").write_text("{")  # still being written: ignored
    (folder / "notes.txt").write_text("not data")
    tick = evaluate(sensor)
    [request] = tick.run_requests
    dataset = request.run_config["ops"]["chat_sl__dataset"]["config"]
    assert dataset == {**config_for("chat_sl", TINY_RUN_CONFIG)["ops"]["chat_sl__dataset"]["config"],
                       "source": "jsonl", "path": str(first)}
    assert request.run_config["ops"]["chat_sl__checkpoint"] == TINY_RUN_CONFIG["ops"]["chat_sl__checkpoint"]
    assert request.tags.items() >= {"crucible/trigger": "drop_folder", "crucible/dropped_file": "week1.jsonl"}.items()

    assert not evaluate(sensor, tick.cursor).run_requests  # seen: nothing new

    second = drop(folder, "week2.parquet", [])
    first.write_text(first.read_text() * 2)  # rewritten in place: a new version of the data
    requests = evaluate(sensor, tick.cursor).run_requests
    paths = {r.run_config["ops"]["chat_sl__dataset"]["config"]["path"]: r for r in requests}
    assert set(paths) == {str(first), str(second)}
    assert paths[str(second)].run_config["ops"]["chat_sl__dataset"]["config"]["source"] == "parquet"
    assert len({r.run_key for r in requests} | {request.run_key}) == 3

    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("CRUCIBLE_DROP_DIR", str(elsewhere))
    assert not evaluate(sensor).run_requests
    moved = drop(elsewhere / "chat_sl", "a.jsonl", arithmetic_conversations(5, 2))
    (crucible_home / "automation" / "chat_sl.yaml").unlink()  # no cap configured: the whole file
    [request] = evaluate(sensor).run_requests
    assert request.run_config["ops"]["chat_sl__dataset"]["config"] == {"source": "jsonl", "path": str(moved), "num_examples": 0}


def test_downstream_assets_follow_an_upstream_change_and_roots_do_not(homes):
    graph = defs.resolve_asset_graph()
    for asset_key in graph.get_all_asset_keys():
        node = graph.get(asset_key)
        # sweeps are experiments a user runs; data a hosted model writes costs money per call: a person starts both
        followed = node.parent_keys and asset_key.path[-1] not in SWEEP_STAGES and asset_key.path[0] != "api_data"
        assert node.automation_condition == (FOLLOW_UPSTREAM if followed else None), asset_key
    assert {s.name: s for s in defs.sensors}["follow_upstream"].default_status == DefaultSensorStatus.STOPPED

    instance = DagsterInstance.ephemeral()
    for asset_key in graph.get_all_asset_keys():
        if not graph.get(asset_key).is_partitioned:
            instance.report_runless_asset_event(AssetMaterialization(asset_key))
    cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
    quiet = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert quiet.total_requested == 0  # nothing changed, nothing runs; nothing missing is built either

    instance.report_runless_asset_event(AssetMaterialization(AssetKey(["sl_basic", "registered_model"])))
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    requested = {k.to_user_string() for k in graph.get_all_asset_keys() if result.get_num_requested(k)}
    # everything built on sl_basic's model retrains in one go: chat_sl, then dpo, math_rl, then distillation
    assert {"chat_sl/base_model", "chat_sl/registered_model", "dpo/registered_model", "math_rl/base_model",
            "distillation/teacher", "distillation/registered_model"} <= requested
    assert not any(k.startswith(("sl_basic/", "base/", "feedback/")) or k.endswith("/dataset") for k in requested)
    assert not any(k.split("/")[1] in SWEEP_STAGES for k in requested)  # a new upstream model retrains no sweep point
    assert not any(k.startswith("api_data/") for k in requested)  # nor asks a hosted model anything
    assert "distillation/base_model" not in requested  # the student starts from base/, which did not change


def write_dagster_yaml(dagster_home: Path) -> None:
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_queue": {"max_concurrent_runs": 1},  # training runs one at a time
    }))


@pytest.mark.slow
def test_a_file_dropped_under_a_running_daemon_becomes_a_registered_version(homes, tmp_path):
    crucible_home, dagster_home = homes
    write_dagster_yaml(dagster_home)
    write_automation_config(crucible_home, "sl_basic", config_for("sl_basic", TINY_RUN_CONFIG))
    env = env_with(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = subprocess.run([sys.executable, "-m", "dagster", "sensor", "start", "sl_basic_drop_folder", "-m", "crucible_jobs"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "crucible_jobs"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    registry = ModelRegistry()
    try:
        dropped = drop(crucible_home / "drop" / "sl_basic", "fresh.jsonl", arithmetic_conversations(600, 5))
        deadline = time.monotonic() + 900  # bounds a hung daemon; a healthy run takes well under a minute of CPU
        while "sl_basic" not in registry.models() and time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(2)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()

    assert "sl_basic" in registry.models(), (tmp_path / "daemon.log").read_text()[-3000:]
    version = registry.resolve("sl_basic@latest")
    store = ArtifactStore()
    dataset = store.latest("sl_basic/dataset")
    assert store.manifest(dataset.fingerprint)["config"]["path"] == str(dropped)
    tokenized = store.latest("sl_basic/tokenized")
    assert version["lineage"]["datasets"]["sl_basic/tokenized"] == tokenized.content_hash
    assert dataset.content_hash in [u["content_hash"] for u in store.manifest(tokenized.fingerprint)["upstream"]]
    with DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        assert run.tags["crucible/dropped_file"] == "fresh.jsonl" and run.tags["dagster/sensor_name"] == "sl_basic_drop_folder"
        gate = [e.dagster_event.event_specific_data for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
                if e.dagster_event.event_specific_data.check_name == "beats_starting_model"]
        assert [g.passed for g in gate] == [True]  # the version went through the blocking gate
