"""math_rl end to end through Dagster on a tiny model: the chain from sl_basic, RL metrics
in metrics.jsonl, the eval report with pass@k (and its out-of-distribution section), the gate
deciding registration, a cached re-run."""

import json

from conftest import TINY_RUN_CONFIG, run_job
from recipes.math_rl import RECIPE as MATH_RL
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from test_sl_basic_job import cached_flags, data_versions


def _gate_passed(result) -> bool:
    evaluation = next(e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                      and e.event_specific_data.check_name == "beats_starting_model"
                      and e.event_specific_data.asset_key.to_user_string() == "math_rl/eval_report")
    return evaluation.event_specific_data.passed


def test_math_rl_chain_metrics_report_and_gate(homes):
    first = run_job("math_rl", TINY_RUN_CONFIG, raise_on_error=False)
    store = ArtifactStore()
    metrics = [json.loads(line) for line in (store.latest("math_rl/checkpoint").dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and {"env/all/reward/total", "env/all/by_group/frac_mixed", "optim/entropy"} <= set(metrics[0])
    report = json.loads((store.latest("math_rl/eval_report").dir / "report.json").read_text())
    assert {"test/accuracy", "start/test/accuracy", "test/pass@2", "test/accuracy_delta_ci"} <= set(report)
    # the out-of-distribution problems (operands never trained on) are reported apart, with their CIs
    assert {"test_ood/sample_accuracy", "start/test_ood/sample_accuracy", "test_ood/sample_accuracy_delta_ci",
            "test_ood/pass@2"} <= set(report) and report["num_ood_problems"] > 100
    assert "Out of distribution" in (store.latest("math_rl/eval_report").dir / "report.md").read_text()
    base = store.manifest(store.latest("math_rl/base_model").fingerprint)
    assert [u["key"] for u in base["upstream"]] == ["sl_basic/registered_model"]
    # the blocking gate alone decides whether a version is registered: its primary metric and its guard
    registered = "math_rl" in ModelRegistry().models()
    assert registered == _gate_passed(first) == MATH_RL.gate.judge(report)[0] == first.success
    if registered:
        assert ModelRegistry().resolve("math_rl")["lineage"]["rl_trained_from"]["model"] == "sl_basic:1"

    second = run_job("math_rl", TINY_RUN_CONFIG, raise_on_error=False)
    assert all(cached_flags(second).values()) and data_versions(second) == data_versions(first)

