"""The tracking sinks on a stored checkpoint, without a run: off by default, one MLflow run
and one TensorBoard run per fingerprint however often it materializes, registry link."""

import json

import pytest

from resources.store.artifact_store import ArtifactRef
from resources.tracking import TrackingResource


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path / "objects" / "c0ffee"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    rows = [{"step": s, "train_mean_nll": 3.0 - s / 10, "num_tokens": 64, "learning_rate": 1e-3} for s in range(5)]
    rows[-1]["test/nll"] = 2.5
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = ArtifactRef(key="demo/checkpoint", fingerprint="ab" * 16, content_hash="c0ffee", path=str(root))
    manifest = {"config": {"learning_rate": 1e-3, "max_steps": 5, "betas": [0.9, 0.95]}, "upstream": [
        {"key": "demo/tokenized", "content_hash": "7070"}], "run_id": "dagster-run", "created_at": 1.0, "summary": {}}
    return ref, manifest


def test_sinks_are_off_by_default(checkpoint, tmp_path):
    TrackingResource().record_checkpoint(*checkpoint, log=lambda _: None)
    assert not (tmp_path / "home").exists()


def test_one_fingerprint_is_one_mlflow_run_and_one_tensorboard_run(checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, manifest = checkpoint
    sinks = TrackingResource(mlflow=True, tensorboard=True)
    for _ in range(2):  # a cached re-materialization logs nothing new
        sinks.record_checkpoint(ref, manifest, log=lambda _: None)
    sinks.link_registration(ref, {"version": 3, "path": "/store/objects/r3"}, "demo")

    client = MlflowClient(tracking_uri=sinks.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("crucible").experiment_id])
    assert run.data.params == {"learning_rate": "0.001", "max_steps": "5", "betas": "[0.9, 0.95]"}
    assert run.data.tags["crucible.registry_version"] == "demo:3"
    assert run.data.tags["crucible.upstream.demo/tokenized"] == "7070"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_mean_nll")] == [0, 1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "test/nll")] == [2.5]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/model", "checkpoint/metrics.jsonl"}

    runs = list((tmp_path / "home" / "tensorboard" / "demo" / "checkpoint").iterdir())
    assert [r.name for r in runs] == [ref.fingerprint]  # no leftover temp dir
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert [s.value for s in events.Scalars("train_mean_nll")] == pytest.approx([3.0, 2.9, 2.8, 2.7, 2.6])
