"""dpo end to end through Dagster. On a tiny model: builds the chain from chat_sl, computes
the reference log-probs once, trains with TRL's metric names, registers with the
`dpo_trained_from` edge, and re-runs without recomputing the reference or the training.
The default chain at full size: tests/test_acceptance.py."""

import copy
import json

import pytest

from conftest import TINY_RUN_CONFIG, run_job
from recipes.dpo import RECIPE as DPO
from crucible_assets.tokenizing import read_rows
from resources.datasets.graders import grade_conversation
from resources.datasets.synthetic import arithmetic_pairs
from resources.hf_io import load_tokenizer
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from test_sl_basic_job import cached_flags, data_versions

TRL_NAMES = {"dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "learning_rate", "num_pairs"}


def tiny_dpo_config() -> dict:
    """The tiny chain with dpo on its default on-policy pairs: the tiny chat_sl model's own
    mistakes, rejected in favour of right answers, which 20 steps at this rate learn to rank."""
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["ops"]["dpo__checkpoint"]["config"]["learning_rate"] = 3e-3
    # 800 records hold out 83 pairs: with 300 (28 pairs) one pair moved the CI's bound by 0.036,
    # and a change of sampler alone took it from 0.107 to 0.036
    config["ops"]["dpo__dataset"]["config"]["num_examples"] = 800
    return config


def test_dpo_chain_on_policy_pairs_and_cached_reference(homes):
    """The model learns to rank its own mistakes below right answers (the gate's primary, with a
    CI clear of zero). Whether it registers is the guard's call: greedy accuracy no worse than
    -0.02 needs ~1000 held-out prompts to prove on a model this small, so registration and its
    lineage edge are asserted on the default chain (test_acceptance.py)."""
    tiny = tiny_dpo_config()
    first = run_job("dpo", tiny, raise_on_error=False)
    versions = data_versions(first)
    assert {"chat_sl/registered_model", "dpo/pairs", "dpo/reference_logprobs", "dpo/checkpoint", "dpo/eval_report"} <= set(versions)

    # on-policy pairs: every row whose rejected side changed holds an answer chat_sl's model
    # sampled (prompt + its tokens, weighted) that the verifier grades wrong; the others keep
    # the dataset's pair
    store = ArtifactStore()
    pairs, tokenized = store.latest("dpo/pairs"), store.latest("dpo/tokenized")
    made_summary = store.manifest(pairs.fingerprint)["summary"]
    tok = load_tokenizer(store.latest("dpo/base_model").dir)
    for split in ("train", "test"):
        given, made = read_rows(tokenized, split), read_rows(pairs, split)
        assert len(made) == len(given) == made_summary[f"{split}_pairs"]
        on_policy = [(g, m) for g, m in zip(given, made) if m["rejected_tokens"] != g["rejected_tokens"]]
        assert len(on_policy) == made_summary[f"{split}_on_policy_pairs"] > 0
        for g, m in on_policy:
            n = len(g["prompt_tokens"])
            assert m["rejected_tokens"][:n] == list(g["prompt_tokens"]) and set(m["rejected_weights"][n:]) == {1.0}
            assert not grade_conversation(tok.decode(m["rejected_tokens"][n:], skip_special_tokens=True), g["reference"])[0]

    metrics = [json.loads(line) for line in (store.latest("dpo/checkpoint").dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and TRL_NAMES <= set(metrics[0]) and "test/rewards/accuracies" in metrics[-1]
    summary = store.manifest(store.latest("dpo/checkpoint").fingerprint)["summary"]
    assert summary["tokens_per_second"] > 0
    report = json.loads((store.latest("dpo/eval_report").dir / "report.json").read_text())
    # measured (fp32, 2026-12-03): 0.217 -> 0.446, delta 0.229, CI [0.138, 0.313] over 83 held-out pairs
    assert report["test/pref_accuracy_delta_ci"][0] > 0.05
    assert ("dpo" in ModelRegistry().models()) == DPO.gate.judge(report)[0] == first.success

    # nothing changed: no reference log-probs, no training
    second = run_job("dpo", tiny, raise_on_error=False)
    assert all(cached_flags(second).values()) and data_versions(second) == versions

    # a new beta retrains, but the reference log-probs are reused
    config = copy.deepcopy(tiny)
    config["ops"]["dpo__checkpoint"]["config"]["beta"] = 0.3
    third = cached_flags(run_job("dpo", config, raise_on_error=False))
    assert third["dpo/reference_logprobs"] and not third["dpo/checkpoint"]

    # as_given: the dataset's own pairs, byte for byte the tokenized rows
    config["ops"]["dpo__pairs"] = {"config": {"source": "as_given"}}
    run_job("dpo", config, raise_on_error=False, assets=["dpo/pairs"])
    assert all(read_rows(store.latest("dpo/pairs"), split) == read_rows(tokenized, split) for split in ("train", "test"))


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
