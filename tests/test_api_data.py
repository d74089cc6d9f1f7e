"""Training data from hosted models, against the local stand-ins (tests/api_standins.py):
teacher-written SFT data that chat_sl trains on, and judge-labelled pairs that dpo trains on,
each a job run from the CLI (`dagster job execute`); a second run makes zero calls."""

import copy
import json

import pytest

from api_standins import BASE_URLS, KEY, StandIn, serve
from conftest import TINY_RUN_CONFIG, execute_job, run_job
from resources.store.artifact_store import ArtifactStore


def models_config(provider: str, base: str) -> dict:
    return {"config": {"provider": provider, "model": "stand-in-1", "base_url": BASE_URLS[provider].format(base=base),
                       "key_variable": "STAND_IN_KEY"}}


def run_twice(job: str, config: dict, homes, tmp_path) -> None:
    """The job from the CLI; then again with the asset's ref and every manifest gone, so it
    re-executes and every call it makes must come from the cache."""
    store = ArtifactStore()
    execute_job(job, config, homes, tmp_path, STAND_IN_KEY=KEY)
    (store.base / "refs" / "api_data" / f"{job}.json").unlink()
    (store.base / "manifests").rename(store.base / "manifests.old")
    execute_job(job, config, homes, tmp_path, STAND_IN_KEY=KEY)


def shorter_answer(provider, messages):
    """A judge with a consistent taste: the shorter answer (a tie when equal)."""
    text = messages[-1]["content"]
    a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
    b = text.split("\n\nAnswer B:\n", 1)[1].split("\n\nWhich answer", 1)[0]
    return "tie" if len(a) == len(b) else ("A" if len(a) < len(b) else "B")


@pytest.mark.slow
def test_teacher_written_sft_data_trains_chat_sl_and_a_rerun_makes_no_call(homes, monkeypatch, tiny, tmp_path):
    stand_in = StandIn()
    stand_in.answer = lambda provider, messages: "The sum is 42."
    base, stop = serve(stand_in)
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["resources"] = {**config["resources"], "models": models_config("google", base)}
    config["ops"]["api_data__teacher_sft"] = {"config": {"num_prompts": 40, "max_tokens": 32}}
    store = ArtifactStore()
    try:
        run_twice("teacher_sft", config, homes, tmp_path)
        assert stand_in.calls["google"] == 40  # 40 the first time, none the second
    finally:
        stop()
    sft = store.latest("api_data/teacher_sft")
    records = [json.loads(line) for line in (sft.dir / "sft.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(r["messages"][-1] == {"role": "assistant", "content": "The sum is 42."} for r in records)

    chat = copy.deepcopy(TINY_RUN_CONFIG)
    chat["ops"]["chat_sl__dataset"] = {"config": {"source": "jsonl", "path": str(sft.dir / "sft.jsonl"), "num_examples": 0}}
    chat["ops"]["chat_sl__base_model"] = {"config": {"base_model": str(tiny)}}
    stages = ["base_model", "dataset", "tokenized", "checkpoint"]
    assert run_job("chat_sl", chat, assets=[f"chat_sl/{s}" for s in stages]).success


@pytest.mark.slow
def test_judge_labelled_pairs_train_dpo_and_a_rerun_makes_no_call(homes, monkeypatch, tiny, tmp_path):
    stand_in = StandIn()
    stand_in.answer = shorter_answer
    base, stop = serve(stand_in)
    config = copy.deepcopy(TINY_RUN_CONFIG)
    config["resources"] = {**config["resources"], "models": models_config("openai", base)}
    config["ops"] |= {"dpo__base_model": {"config": {"base_model": str(tiny)}},
                      "api_data__labelled_pairs": {"config": {"num_prompts": 30, "max_tokens": 12}}}
    store = ArtifactStore()
    try:
        run_twice("labelled_pairs", config, homes, tmp_path)
        assert stand_in.calls["openai"] == 60  # each prompt judged in both orders the first time, none the second
    finally:
        stop()
    pairs = store.latest("api_data/labelled_pairs")
    records = [json.loads(line) for line in (pairs.dir / "pairs.jsonl").read_text().splitlines()]
    summary = store.manifest(pairs.fingerprint)["summary"]
    assert len(records) == summary["rows"] > 5 and summary["rows"] + summary["dropped_same_answer"] + summary["dropped_inconsistent"] == 30
    assert all(len(r["chosen"][-1]["content"]) < len(r["rejected"][-1]["content"]) for r in records)  # the judge's taste, kept

    dpo = copy.deepcopy(TINY_RUN_CONFIG)
    dpo["ops"] |= {"dpo__base_model": {"config": {"base_model": str(tiny)}},
                   "dpo__dataset": {"config": {"source": "jsonl", "path": str(pairs.dir / "pairs.jsonl"), "num_examples": 0}},
                   "dpo__pairs": {"config": {"source": "as_given"}}}  # the judge's labels, not re-sampled ones
    stages = ("base_model", "dataset", "tokenized", "pairs", "reference_logprobs", "checkpoint")
    assert run_job("dpo", dpo, assets=[f"dpo/{s}" for s in stages]).success
