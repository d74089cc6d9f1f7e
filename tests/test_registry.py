"""The model registry: versions, aliases that move only through promotion, the promotion gate
(a blocking check comparing the new version with the champion on the recipe's metric and a
margin), hand promotion and rollback recorded with who and why, the HF export loading
offline, and `crucible compare`."""

import copy
import json
import subprocess
import sys

import pytest

from conftest import TINY_RUN_CONFIG, env_with, run_job
from crucible_jobs.cli import main as crucible
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry

GATE = {"metric": "test/nll", "lower_is_better": True, "margin": 0.05}


def entry(fp: str, nll: float) -> dict:
    return {"fingerprint": fp * 32, "content_hash": fp * 32, "metrics": {"test/nll": nll}, "run_id": "r"}


def test_gate_promotes_only_by_more_than_the_margin(tmp_path):
    registry = ModelRegistry(root=str(tmp_path))
    assert registry.register("m", entry("a", 1.0), GATE)["version"] == 1
    assert registry.models()["m"]["aliases"] == {"latest": 1, "staging": 1}  # no champion before the gate
    assert registry.judge("m", 1, who="t")["passed"]
    registry.register("m", entry("b", 0.96), GATE)  # better, but by less than the margin
    decision = registry.judge("m", 2, who="t")
    assert not decision["passed"] and "does not beat champion v1" in decision["reason"] and "0.05" in decision["reason"]
    assert registry.models()["m"]["aliases"] == {"latest": 2, "staging": 2, "champion": 1}
    registry.register("m", entry("c", 0.90), GATE)
    assert registry.judge("m", 3, who="t")["passed"]
    assert registry.resolve("m@champion")["version"] == 3
    # registering the same fingerprint again is the same version
    assert registry.register("m", entry("c", 0.90), GATE)["version"] == 3


def on_set(fp: str, nll: float, eval_set: str) -> dict:
    return entry(fp, nll) | {"eval_set": eval_set * 64, "eval_report": f"report-{fp}"}


def measured(champion: dict, eval_set: str, **outcome) -> dict:
    """A champion_eval record (crucible_assets/champion_eval.py) as the check hands it to judge."""
    return {"champion": {"version": champion["version"], "fingerprint": champion["fingerprint"]}, "eval_set": eval_set * 64,
            "source": {"asset": "m/champion_eval", "fingerprint": "f" * 64, "data_version": "d" * 64}, **outcome}


def test_gate_compares_with_the_champion_measured_on_the_candidates_eval_set(tmp_path):
    """The champion's own value (0.5, on set a) is not what the candidate is compared with: its
    value on the candidate's set (b) is, and the decision says which set and where it came from."""
    registry = ModelRegistry(root=str(tmp_path))
    v1 = registry.register("m", on_set("a", 0.5, "a"), GATE)
    registry.judge("m", 1, who="t")
    registry.register("m", on_set("b", 0.9, "b"), GATE)
    decision = registry.judge("m", 2, who="t", measured=measured(v1, "b", status="evaluated", champion_value=1.2))
    assert decision["passed"] and decision["verdict"] == "promoted"
    assert (decision["eval_set"], decision["candidate_value"], decision["champion_value"]) == ("b" * 64, 0.9, 1.2)
    assert decision["champion_value_from"] == {"source": "champion_eval", "asset": "m/champion_eval", "fingerprint": "f" * 64,
                                               "data_version": "d" * 64}
    assert abs(decision["improvement"] - 0.3) < 1e-12 and decision["margin"] == 0.05
    assert "both on eval set bbbbbbbbbbbb" in decision["reason"] and "by m/champion_eval dddddddddddd" in decision["reason"]
    assert registry.resolve("m@champion")["version"] == 2
    # the champion wins on the candidate's set: compared, not promoted
    registry.register("m", on_set("c", 0.9, "c"), GATE)
    decision = registry.judge("m", 3, who="t", measured=measured(registry.resolve("m:2"), "c", status="evaluated", champion_value=0.7))
    assert not decision["passed"] and decision["verdict"] == "not promoted" and decision["eval_set"] == "c" * 64
    assert "does not beat champion v2" in decision["reason"] and decision["champion_value"] == 0.7
    # on the champion's own set its own report's value is used, and says so
    registry.register("m", on_set("d", 0.5, "b"), GATE)
    decision = registry.judge("m", 4, who="t")
    assert decision["champion_value"] == 0.9 and decision["champion_value_from"]["source"] == "own_eval_report"


def test_gate_refuses_naming_both_eval_sets_when_the_champion_was_not_measured_on_the_candidates(tmp_path):
    registry = ModelRegistry(root=str(tmp_path))
    v1 = registry.register("m", on_set("a", 0.5, "a"), GATE)
    registry.judge("m", 1, who="t")
    tokenizer = "its tokenizer (2048 tokens) is not the one the held-out rows were tokenized with"
    cases = {
        "b": (measured(v1, "b", status="not_evaluable", reason=tokenizer), f"v1 could not be evaluated on bbbbbbbbbbbb: {tokenizer}"),
        "c": (None, "no eval of v1 on cccccccccccc was found"),
        "e": (measured(v1, "x", status="evaluated", champion_value=9.0), "no eval of v1 on eeeeeeeeeeee"),  # another set's
    }
    for version, (fp, (record, why)) in enumerate(cases.items(), 2):
        registry.register("m", on_set(fp, 0.1, fp), GATE)
        decision = registry.judge("m", version, who="t", measured=record)
        assert not decision["passed"] and decision["verdict"] == "not compared" and decision["eval_set"] is None
        assert decision["eval_sets"] == {"candidate": fp * 64, "champion": "a" * 64}
        assert f"evaluated on eval set {fp * 12} and champion v1 on aaaaaaaaaaaa, and {why}" in decision["reason"]
    # an eval of a champion that has since changed measures the wrong model
    registry.promote("m:2", "champion", reason="by hand", who="alice")
    registry.register("m", on_set("f", 0.1, "f"), GATE)
    assert registry.judge("m", 5, who="t", measured=measured(v1, "f", status="evaluated", champion_value=9.0))["verdict"] == "not compared"


def test_judged_against_champion_stays_for_a_cached_rerun_and_old_entries_still_judge(tmp_path):
    """champion_for names the champion a candidate was (or will be) judged against, so its
    champion_eval's cache key survives the candidate's own promotion; entries registered
    before eval sets and eval report fingerprints were recorded still compare as before."""
    registry = ModelRegistry(root=str(tmp_path))
    assert registry.champion_for("m", "report-a") is None  # no model yet
    registry.register("m", on_set("a", 0.5, "a"), GATE)
    assert registry.champion_for("m", "report-a") is None  # registered, not judged, no champion
    registry.judge("m", 1, who="t")
    assert registry.champion_for("m", "report-a") is None  # judged against no champion
    assert registry.champion_for("m", "report-b")["version"] == 1  # a new candidate meets v1
    registry.register("m", on_set("b", 0.1, "a"), GATE)
    registry.judge("m", 2, who="t")
    assert registry.resolve("m@champion")["version"] == 2 and registry.champion_for("m", "report-b")["version"] == 1

    old = ModelRegistry(root=str(tmp_path / "old"))
    for i, (fp, nll) in enumerate([("a", 1.0), ("b", 0.5)], 1):  # no eval_set, no eval_report, no measurement
        old.register("m", entry(fp, nll), GATE)
        decision = old.judge("m", i, who="t")
    assert decision["passed"] and decision["champion_value"] == 1.0 and decision["eval_set"] is None


def test_models_table_shows_each_decision_old_and_new(tmp_path, monkeypatch, capsys):
    """`crucible models`: under each judged version, its verdict, both values, the shared eval
    set (or the two that did not compare) and the margin; decisions recorded before those
    fields existed still print."""
    registry = ModelRegistry(root=str(tmp_path / "registry"))
    v1 = registry.register("m", on_set("a", 0.5, "a"), GATE)
    registry.judge("m", 1, who="t")
    registry.register("m", on_set("b", 0.9, "b"), GATE)
    registry.judge("m", 2, who="t", measured=measured(v1, "b", status="evaluated", champion_value=1.2))
    registry.register("m", on_set("c", 0.1, "c"), GATE)
    registry.judge("m", 3, who="t")
    old = ModelRegistry(root=str(tmp_path / "registry"))
    with old._locked() as (data, _):  # a decision as recorded before eval sets were compared
        data["models"]["old"] = {"aliases": {"champion": 1}, "versions": [
            {**entry("a", 1.0), "version": 1, "decision": {"candidate": 1, "champion": None, "passed": True, "reason": "first"}},
            {**entry("b", 0.9), "version": 2, "decision": {"candidate": 2, "champion": 1, "passed": False, "metric": "test/nll",
                                                          "margin": 0.05, "candidate_value": 0.9, "champion_value": 1.0,
                                                          "reason": "does not beat"}}]}
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    assert crucible(["models"]) == 0
    table = capsys.readouterr().out
    assert "decision: promoted: test/nll 0.9000 vs champion v1 1.2000, margin 0.05, both on eval set bbbbbbbbbbbb " \
           "(champion measured there by m/champion_eval dddddddddddd)" in table
    assert "decision: not compared: test/nll 0.1000 vs champion v2 n/a, margin 0.05, eval sets differ: cccccccccccc " \
           "(candidate) vs bbbbbbbbbbbb (champion)" in table
    assert "decision: promoted: first" in table and "decision: not promoted: test/nll 0.9000 vs champion v1 1.0000, margin 0.05\n" in table


def test_a_version_is_judged_once_so_a_rollback_sticks(tmp_path):
    registry = ModelRegistry(root=str(tmp_path))
    for i, (fp, nll) in enumerate([("a", 1.0), ("b", 0.5)], 1):
        registry.register("m", entry(fp, nll), GATE)
        registry.judge("m", i, who="t")
    assert registry.rollback("m", "champion", reason="v2 misbehaves in the demo", who="alice") == 1
    assert registry.judge("m", 2, who="t")["passed"]  # the recorded decision, re-reported ...
    assert registry.resolve("m@champion")["version"] == 1  # ... moves nothing


def test_hand_moves_are_audited_with_who_and_why(tmp_path):
    registry = ModelRegistry(root=str(tmp_path))
    for i, fp in enumerate("abc", 1):
        registry.register("m", entry(fp, 1.0 - i / 10), GATE)
    registry.judge("m", 1, who="gate")
    registry.promote("m:3", "champion", reason="best on the new eval", who="alice")
    with pytest.raises(ValueError, match="already v3"):
        registry.promote("m@latest", "champion", reason="again", who="alice")
    registry.promote("m:2", "champion", reason="v3 too slow", who="bob")
    assert registry.rollback("m", "champion", reason="speed fixed", who="carol") == 3
    assert registry.rollback("m", "champion", reason="back to the first", who="carol") == 1
    with pytest.raises(KeyError, match="no earlier version"):
        registry.rollback("m", "champion", reason="nothing left", who="carol")
    with pytest.raises(KeyError, match="alias 'best'"):
        registry.promote("m:2", "best", reason="x")
    moves = [(e["event"], e["version"], e["user"], e["reason"]) for e in registry.audit_log() if e.get("alias") == "champion"]
    assert moves == [("promote", 1, "gate", "v1 is the first version judged; it becomes champion"),
                     ("promote", 3, "alice", "best on the new eval"), ("promote", 2, "bob", "v3 too slow"),
                     ("rollback", 3, "carol", "speed fixed"), ("rollback", 1, "carol", "back to the first")]
    assert registry.history("m")[-1]["previous"] == 3


def with_ops(**ops) -> dict:
    config = copy.deepcopy(TINY_RUN_CONFIG)
    for op, fields in ops.items():
        config["ops"].setdefault(op, {"config": {}})["config"].update(fields)
    return config


def gate_evaluation(result):
    return next(e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                and e.asset_check_evaluation_data.check_name == "beats_champion")


GENERATE = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt")
ids = getattr(ids, "input_ids", ids)
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print("GENERATED", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
"""


@pytest.mark.slow
def test_second_training_becomes_champion_only_by_the_margin(homes, capsys):
    """Trainings of sl_basic: a short first one (champion by default), a longer second one on
    the same data that beats it (promoted), a third that must beat the champion by an
    impossible margin (rejected: the champion stays and the check says why), and a fourth on
    other data, whose eval set differs, so the champion is evaluated on the fourth's set
    (sl_basic/champion_eval) and compared there."""
    registry, store = ModelRegistry(), ArtifactStore()
    assert run_job("sl_basic", with_ops(sl_basic__checkpoint={"max_steps": 20})).success
    assert registry.resolve("sl_basic@champion")["version"] == 1

    # the export loads offline and generates
    export = store.latest("sl_basic/registered_model").dir
    card = (export / "README.md").read_text()
    for section in ("## Lineage", "`fine_tuned_from`", "## Data", "## How it was trained", "95% CI", "## Intended use"):
        assert section in card
    assert registry.resolve("sl_basic:1")["data_hashes"]["sl_basic/dataset"] in card
    out = subprocess.run([sys.executable, "-c", GENERATE, str(export)], capture_output=True, text=True,
                         env=env_with(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert "GENERATED" in out.stdout

    second = run_job("sl_basic", with_ops(sl_basic__registered_model={"promotion_margin": 0.01}))
    v1, v2 = registry.resolve("sl_basic:1"), registry.resolve("sl_basic:2")
    assert v2["metrics"]["test/nll"] < v1["metrics"]["test/nll"] - 0.01
    assert second.success and gate_evaluation(second).passed
    assert v2["eval_set"] == v1["eval_set"] and v2["eval_set"][:12] in gate_evaluation(second).description
    assert registry.models()["sl_basic"]["aliases"] == {"latest": 2, "staging": 2, "champion": 2}
    assert v2["data_hashes"] == v1["data_hashes"] and v2["config_hash"] != v1["config_hash"]
    assert set(v2["lineage"]) >= {"fine_tuned_from", "datasets"}

    third = run_job("sl_basic", with_ops(sl_basic__checkpoint={"max_steps": 41}, sl_basic__registered_model={"promotion_margin": 5.0}),
                    raise_on_error=False)
    evaluation = gate_evaluation(third)
    assert not evaluation.passed and third.success  # registered, not promoted: a warning, not a failed run
    assert "does not beat champion v2" in evaluation.description and "margin 5.0" in evaluation.description
    assert evaluation.metadata["champion_now"].value == 2
    assert registry.models()["sl_basic"]["aliases"] == {"latest": 3, "staging": 3, "champion": 2}

    # other data, so another held-out split: its number proves nothing against v2's own, so v2 is
    # evaluated on v4's split and compared there (an impossible margin keeps the champion)
    fourth = run_job("sl_basic", with_ops(sl_basic__dataset={"seed": 2}, sl_basic__registered_model={"promotion_margin": 5.0}))
    evaluation, v4 = gate_evaluation(fourth), registry.resolve("sl_basic:4")
    assert fourth.success and not evaluation.passed and v4["eval_set"] != v2["eval_set"]
    assert "does not beat champion v2" in evaluation.description and f"both on eval set {v4['eval_set'][:12]}" in evaluation.description
    assert v4["decision"]["champion_value_from"]["asset"] == "sl_basic/champion_eval"
    assert v4["decision"]["champion_value"] != v2["metrics"]["test/nll"]
    assert registry.models()["sl_basic"]["aliases"] == {"latest": 4, "staging": 4, "champion": 2}
    capsys.readouterr()
    assert crucible(["models", "--json"]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)["sl_basic"]["versions"]}
    assert listed[4]["eval_set"] == v4["eval_set"] and listed[4]["decision"]["eval_set"] == v4["eval_set"]
    assert listed[2]["decision"]["eval_set"] == v1["eval_set"]

    capsys.readouterr()
    assert crucible(["models"]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "gate: failed" in listing
    assert crucible(["models", "rollback", "sl_basic", "--reason", "compare the first again", "--by", "alice"]) == 0
    assert registry.resolve("sl_basic@champion")["version"] == 1
    assert registry.audit_log()[-1] | {"time": 0} == {
        "time": 0, "event": "rollback", "model": "sl_basic", "alias": "champion", "version": 1, "previous": 2,
        "user": "alice", "reason": "compare the first again"}

    # the next recipe builds on the champion (v1 again), not on the latest registration (v3)
    assert run_job("chat_sl", TINY_RUN_CONFIG, assets=["chat_sl/base_model"]).success
    start = store.manifest(store.latest("chat_sl/base_model").fingerprint)["summary"]
    assert (start["registered_model"], start["registered_as"]) == ("sl_basic:1", "champion")
    assert store.latest("chat_sl/base_model").content_hash == registry.resolve("sl_basic:1")["content_hash"]

    capsys.readouterr()
    assert crucible(["compare", "sl_basic:1", "sl_basic:2"]) == 0
    report = capsys.readouterr().out
    nll = next(line for line in report.splitlines() if line.startswith("test/nll "))
    assert f"{v1['metrics']['test/nll']:.4f}" in nll and f"{v2['metrics']['test/nll'] - v1['metrics']['test/nll']:+.4f}" in nll
    assert "  checkpoint.max_steps: 20 -> 40" in report and "  data " not in report  # one dataset, two trainings
    assert crucible(["compare", "sl_basic:2", "sl_basic:4"]) == 0
    assert f"  data sl_basic/dataset: {v2['data_hashes']['sl_basic/dataset']} -> {v4['data_hashes']['sl_basic/dataset']}" \
        in capsys.readouterr().out


def test_compare_ci_widens_with_both_models_uncertainty():
    from resources.store.compare import difference_ci

    assert difference_ci(0.1, None, [0.0, 1.0]) is None
    lo, hi = difference_ci(-0.2, [0.9, 1.1], [0.7, 0.9])  # each CI half-width 0.1 -> se 0.1/1.96
    assert abs((hi - lo) / 2 - 0.1 * 2 ** 0.5) < 1e-9 and abs((hi + lo) / 2 + 0.2) < 1e-9
