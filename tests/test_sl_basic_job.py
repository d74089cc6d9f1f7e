"""sl_basic end to end through Dagster on a tiny model: trains, beats its start with a CI
excluding zero, registers, caches, audits, reproduces, resumes after SIGKILL, and refuses
bad input without touching the store or the registry."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import TINY_RUN_CONFIG, config_for, env_with, heavy_imports_after, run_job, tree_digest
from crucible_jobs.cli import main as crucible
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry


def data_versions(result) -> dict[str, str]:
    return {
        e.asset_key.to_user_string(): e.step_materialization_data.materialization.tags["dagster/data_version"]
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }


def cached_flags(result) -> dict[str, bool]:
    return {
        e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata["cached"].value
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }


def test_sl_basic_trains_registers_caches_and_audits(homes, capsys):
    first = run_job("sl_basic", TINY_RUN_CONFIG)
    assert first.success
    versions = data_versions(first)
    assert set(versions) >= {"sl_basic/dataset", "sl_basic/tokenized", "sl_basic/checkpoint", "sl_basic/eval_report", "sl_basic/registered_model"}
    assert not any(cached_flags(first).values())

    store, registry = ArtifactStore(), ModelRegistry()
    report = json.loads((store.latest("sl_basic/eval_report").dir / "report.json").read_text())
    assert report["test/nll"] < report["start/test/nll"]
    assert report["test/nll_delta_ci"][1] < 0  # the CI of the improvement excludes zero
    champion = registry.resolve("sl_basic@champion")
    assert champion["version"] == 1 and champion["lineage"]["fine_tuned_from"]
    metrics = (store.latest("sl_basic/checkpoint").dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 40 and "test/nll" in json.loads(metrics[-1])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = store.latest("sl_basic/registered_model").dir
    AutoModelForCausalLM.from_pretrained(export)
    assert AutoTokenizer.from_pretrained(export).chat_template
    assert (export / "README.md").read_text().startswith("# sl_basic")

    # nothing changed: every asset is a cache hit with the same data version, no new registry version
    work_before = tree_digest(store.base / "objects")
    second = run_job("sl_basic", TINY_RUN_CONFIG)
    assert all(cached_flags(second).values())
    assert data_versions(second) == versions
    assert tree_digest(store.base / "objects") == work_before
    assert len(registry.models()["sl_basic"]["versions"]) == 1

    # and in a fresh process, as `dagster job execute` runs it, a cache-hit run loads no training library
    heavy, out = heavy_imports_after("from conftest import TINY_RUN_CONFIG, run_job\n"
                                     "print(run_job('sl_basic', TINY_RUN_CONFIG).success)")
    assert out.splitlines()[-1] == "True" and heavy == []

    assert crucible(["lineage", "sl_basic/registered_model", "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    keys = json.dumps(tree)
    assert versions["sl_basic/dataset"] in keys and '"run_id"' in keys
    assert crucible(["audit", "sl_basic@champion"]) == 0
    assert crucible(["models"]) == 0
    assert "champion" in capsys.readouterr().out

    # a flipped byte is named by the audit
    weights = store.latest("sl_basic/checkpoint").dir / "model" / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert crucible(["audit", "sl_basic/registered_model"]) == 1
    assert "model/model.safetensors" in capsys.readouterr().out


def test_malformed_jsonl_fails_clearly_and_changes_nothing(homes, tmp_path):
    assert run_job("sl_basic", TINY_RUN_CONFIG).success
    crucible_home, _ = homes
    before = tree_digest(crucible_home)
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": 3}]}\n')
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["sl_basic__dataset"]["config"] = {"source": "jsonl", "path": str(bad)}
    result = run_job("sl_basic", config, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.step_failure_data.error)
    assert str(bad) in message and "line 3" in message and "messages[0].content" in message
    assert tree_digest(crucible_home) == before


def checkpoint_hash() -> str:
    return ArtifactStore().latest("sl_basic/checkpoint").content_hash


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_identical_bytes(homes, tmp_path, monkeypatch):
    """Reference: an uninterrupted run in one store. Then a second fresh store whose first
    run is SIGKILLed after a resumable save; the re-run resumes and ends on the same bytes."""
    assert run_job("sl_basic", TINY_RUN_CONFIG).success
    reference = checkpoint_hash()

    home = tmp_path / "second"
    dagster_home = tmp_path / "second_dagster"
    dagster_home.mkdir()
    monkeypatch.setenv("CRUCIBLE_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config_for("sl_basic", TINY_RUN_CONFIG)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "crucible_jobs", "-j", "sl_basic", "-c", str(cfg)],
        env=env_with(CRUCIBLE_HOME=str(home), DAGSTER_HOME=str(dagster_home)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 300
    while not list((home / "store" / "work").glob("*/step_0000020")) and time.time() < deadline:
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (home / "store" / "refs" / "sl_basic" / "checkpoint.json").exists()

    resumed = run_job("sl_basic", TINY_RUN_CONFIG)
    assert resumed.success
    store = ArtifactStore()
    summary = store.manifest(store.latest("sl_basic/checkpoint").fingerprint)["summary"]
    assert summary["resumed_from_step"] >= 20, "the re-run did not resume from the saved state"
    assert checkpoint_hash() == reference
