"""dpo end to end through Dagster. On a tiny model: builds the chain from chat_sl, computes
the reference log-probs once, trains with TRL's metric names, registers with the
`dpo_trained_from` edge, and re-runs without recomputing the reference or the training.
Slow: the embedded default chain at full size meets the recipes' acceptance figures."""

import copy
import json

import pytest

from conftest import TINY_RUN_CONFIG, run_job
from resources.datasets.synthetic import arithmetic_pairs
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from test_sl_basic_job import cached_flags, data_versions

TRL_NAMES = {"dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "learning_rate", "num_pairs"}


def easy_pairs_config(tmp_path) -> dict:
    """The tiny model cannot learn near-miss arithmetic in 20 steps; a refusal as the
    rejected answer is a preference it can learn, so the gate's pass is meaningful."""
    pairs = arithmetic_pairs(300, 5)
    for p in pairs:
        p["rejected"] = p["rejected"][:-1] + [{"role": "assistant", "content": "I do not know."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["dpo__dataset"]["config"].update(source="jsonl", path=str(path))
    return config


def test_dpo_chain_reference_cached_and_registered(homes, tmp_path):
    tiny = easy_pairs_config(tmp_path)
    first = run_job("dpo", tiny)
    assert first.success
    versions = data_versions(first)
    assert {"chat_sl/registered_model", "dpo/reference_logprobs", "dpo/checkpoint", "dpo/registered_model"} <= set(versions)

    store = ArtifactStore()
    metrics = [json.loads(line) for line in (store.latest("dpo/checkpoint").dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and TRL_NAMES <= set(metrics[0]) and "test/rewards/accuracies" in metrics[-1]
    summary = store.manifest(store.latest("dpo/checkpoint").fingerprint)["summary"]
    assert summary["tokens_per_second"] > 0
    report = json.loads((store.latest("dpo/eval_report").dir / "report.json").read_text())
    assert report["test/pref_accuracy_delta_ci"][0] > 0  # the gate passed: better than the start, CI excludes zero
    entry = ModelRegistry().resolve("dpo@champion")
    assert entry["lineage"]["dpo_trained_from"]["model"] == "chat_sl:1"

    # nothing changed: no reference log-probs, no training
    second = run_job("dpo", tiny)
    assert all(cached_flags(second).values()) and data_versions(second) == versions

    # a new beta retrains, but the reference log-probs are reused
    config = copy.deepcopy(tiny)
    config["ops"]["dpo__checkpoint"]["config"]["beta"] = 0.3
    third = cached_flags(run_job("dpo", config, raise_on_error=False))
    assert third["dpo/reference_logprobs"] and not third["dpo/checkpoint"]


@pytest.mark.slow
def test_default_chain_meets_acceptance(homes):
    """`dagster job execute -m crucible_jobs -j dpo` on the embedded defaults: sl_basic, chat_sl and dpo each
    register a model that beats its start with a CI excluding zero (about 6 minutes)."""
    assert run_job("dpo", {}).success
    store = ArtifactStore()
    report = lambda recipe: json.loads((store.latest(f"{recipe}/eval_report").dir / "report.json").read_text())  # noqa: E731
    assert report("sl_basic")["test/nll_delta_ci"][1] < 0
    chat = report("chat_sl")
    assert chat["test/nll_delta_ci"][1] < 0 and chat["test/accuracy_delta_ci"][0] > 0
    dpo = report("dpo")
    assert dpo["test/pref_accuracy_delta_ci"][0] > 0 and dpo["test/accuracy_delta_ci"][0] > 0
    assert {m: len(v["versions"]) for m, v in ModelRegistry().models().items()} == {"sl_basic": 1, "chat_sl": 1, "dpo": 1}


def test_bad_dpo_data_fails_the_run_before_any_training(homes, tmp_path):
    """The dpo job's own data is bad (a pair whose chosen equals its rejected): the run fails
    in the dataset stage, and no recipe of the chain trains first (sl_basic, chat_sl)."""
    pairs = arithmetic_pairs(30, 0)
    pairs[7] = {**pairs[7], "rejected": pairs[7]["chosen"]}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["dpo__dataset"] = {"config": {"source": "jsonl", "path": str(path)}}
    result = run_job("dpo", config, raise_on_error=False)
    assert not result.success
    failures = {e.step_key: e.event_specific_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    assert {"dpo__dataset", "dpo__dataset_checks"} & set(failures), failures
    assert "sl_basic__checkpoint" in failures and "failed earlier in this run" in failures["sl_basic__checkpoint"]
    refs = ArtifactStore().base / "refs"
    assert not any((refs / recipe / "checkpoint.json").exists() for recipe in ("sl_basic", "chat_sl", "dpo"))
