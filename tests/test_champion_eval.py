"""Promotion compares like with like: a candidate evaluated on another eval set than the
champion is compared with the champion evaluated on the candidate's set (`<recipe>/champion_eval`),
and a champion that cannot be evaluated there (another tokenizer) is refused by name."""

import json
import random

from conftest import run_job
from crucible_assets.champion_eval import vocabulary_difference
from crucible_assets.suites.assets import DEFAULT_SUITES, suite_stage
from crucible_jobs.cli import main as crucible
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from test_registry import with_ops
from test_sl_basic_job import cached_flags


def test_a_champion_with_another_vocabulary_cannot_be_evaluated_on_the_candidates_rows(tiny, tmp_path):
    from crucible_assets.base import train_tokenizer

    assert vocabulary_difference(tiny, tiny) is None
    train_tokenizer(tmp_path / "other", 300, 0)  # the default corpus holds 326 tokens' worth of merges
    why = vocabulary_difference(tmp_path / "other", tiny)
    assert why.startswith("its tokenizer (300 tokens) is not the one the held-out rows were tokenized with (")
    assert "of them with another id or none in the champion's" in why


def conversations(n: int) -> list[dict]:
    """A second data set: sums asked and answered in other words than the default chats."""
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": f"Please add {a} and {b}."},
                          {"role": "assistant", "content": f"{a} plus {b} makes {a + b}."}]} for a, b in pairs]


STAGES = ("base_model", "dataset", "tokenized", "checkpoint", "eval_report", "champion_eval", "registered_model",
          *map(suite_stage, DEFAULT_SUITES))


def run_chat_sl(start, **dataset):
    """chat_sl alone (no sl_basic chain), from the tiny test model, briefly."""
    config = with_ops(chat_sl__base_model={"base_model": str(start)}, chat_sl__dataset=dataset,
                      chat_sl__checkpoint={"max_steps": 20, "eval_every": 10, "save_every": 10})
    return run_job("chat_sl", config, assets=[f"chat_sl/{s}" for s in STAGES])


def promotion(result):
    return next(e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                and e.asset_check_evaluation_data.check_name == "beats_champion")


def materialization(result, asset: str):
    return next(e.step_materialization_data.materialization for e in result.all_events
                if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key.to_user_string() == asset)


def test_second_data_set_then_default_compares_on_the_candidates_eval_set(homes, tiny, tmp_path, capsys):
    """chat_sl on a second data set (champion v1), then on the default: v2's decision names the
    one eval set both values were measured on, v2's, and the champion's value there comes from
    champion_eval's eval of v1 on that set, not from v1's own report."""
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(240)))
    assert run_chat_sl(tiny, source="jsonl", path=str(path), num_examples=0, test_fraction=0.2).success
    registry, store = ModelRegistry(), ArtifactStore()
    assert registry.resolve("chat_sl@champion")["version"] == 1
    assert json.loads((store.latest("chat_sl/champion_eval").dir / "champion_eval.json").read_text())["status"] == "not_needed"

    second = run_chat_sl(tiny)
    assert second.success
    v1, v2 = registry.resolve("chat_sl:1"), registry.resolve("chat_sl:2")
    assert v1["eval_set"] != v2["eval_set"]
    champion_eval = store.latest("chat_sl/champion_eval")
    report = json.loads((champion_eval.dir / "report.json").read_text())
    record = json.loads((champion_eval.dir / "champion_eval.json").read_text())
    assert report["eval_set"]["id"] == v2["eval_set"] == record["eval_set"] and record["status"] == "evaluated"

    decision = v2["decision"]
    assert decision["eval_set"] == v2["eval_set"] and decision["candidate_value"] == v2["metrics"]["test/nll"]
    assert decision["champion_value"] == report["test/nll"] == record["champion_value"]
    assert decision["champion_value"] != v1["metrics"]["test/nll"]  # not the champion's own report's value
    assert decision["champion_value_from"] == {"source": "champion_eval", "asset": "chat_sl/champion_eval",
                                               "fingerprint": champion_eval.fingerprint,
                                               "data_version": champion_eval.content_hash}
    assert decision["verdict"] == ("promoted" if decision["passed"] else "not promoted")
    assert f"both on eval set {v2['eval_set'][:12]}" in promotion(second).description
    on_disk = json.loads((homes[0] / "registry" / "registry.json").read_text())["models"]["chat_sl"]["versions"][1]
    assert on_disk["decision"] == decision

    # the UI: the champion's report on the candidate's set as the asset's metadata
    shown = materialization(second, "chat_sl/champion_eval").metadata
    assert shown["status"].value == "evaluated" and shown["champion"].value == "chat_sl:1"
    assert shown["eval_set"].value == v2["eval_set"] and "eval_table" in shown and "comparison" in shown

    capsys.readouterr()
    assert crucible(["models", "--json"]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)["chat_sl"]["versions"]}
    assert listed[2]["eval_set"] == v2["eval_set"] and listed[2]["decision"] == decision
    assert crucible(["models"]) == 0
    table = capsys.readouterr().out
    assert f"test/nll {decision['candidate_value']:.4f} vs champion v1 {decision['champion_value']:.4f}, margin 0.0, both on " \
           f"eval set {v2['eval_set'][:12]} (champion measured there by chat_sl/champion_eval" in table

    # a cached re-run: every asset a hit, champion_eval too (v2 is judged against v1, whoever is champion now)
    third = run_chat_sl(tiny)
    assert third.success and all(cached_flags(third).values()) and "chat_sl/champion_eval" in cached_flags(third)
    assert registry.resolve("chat_sl:2")["decision"] == decision and len(registry.models()["chat_sl"]["versions"]) == 2
    print("\nDECISION", json.dumps(decision, indent=1, sort_keys=True))
