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
    other data, whose eval set differs, so no comparison is made at all."""
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

    # other data, so another held-out split: a better-looking number on it proves nothing against v2's
    fourth = run_job("sl_basic", with_ops(sl_basic__dataset={"seed": 2}))
    evaluation, v4 = gate_evaluation(fourth), registry.resolve("sl_basic:4")
    assert fourth.success and not evaluation.passed and v4["eval_set"] != v2["eval_set"]
    assert f"evaluated on eval set {v4['eval_set'][:12]} and champion v2 on {v2['eval_set'][:12]}" in evaluation.description
    assert registry.models()["sl_basic"]["aliases"] == {"latest": 4, "staging": 4, "champion": 2}
    capsys.readouterr()
    assert crucible(["models", "--json"]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)["sl_basic"]["versions"]}
    assert listed[4]["eval_set"] == v4["eval_set"] and listed[4]["decision"]["eval_set"] is None
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
