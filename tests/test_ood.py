"""Out-of-distribution held-out items (the test_ood split): a dataset config names a generator
outside the training distribution, the dataset writes it as a third split that the blocking
`held_out_disjoint` check covers, and math_rl's eval report gives its metrics apart from the
gated ones."""

import json

from conftest import TINY_RUN_CONFIG, run_job
from crucible_assets.evaluation import markdown
from crucible_assets.train.algorithm import EvalRun
from crucible_assets.train.rl import RlConfig, RlEvalConfig, evaluate_rl
from resources.backends.types import SampledSequence
from resources.datasets.splits import record_identity
from resources.store.artifact_store import ArtifactStore
from resources.store.jsonl import read_jsonl


class Answers:
    """A stand-in model that answers each prompt (its one token is the question's number) with
    that number plus `off`: off 0 is always right."""

    class tokenizer:  # noqa: N801 (the client attribute's name)
        @staticmethod
        def decode(tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    def __init__(self, off: int) -> None:
        self.off = off

    def sample(self, prompts, num_samples, params):
        return [[SampledSequence([p[0] + self.off], [0.0], "stop")] * num_samples for p in prompts]


def rows(answers: range) -> list[dict]:
    return [{"prompt_tokens": [a], "reference": str(a)} for a in answers]


def test_rl_eval_reports_ood_metrics_apart_and_only_when_there_are_ood_problems():
    run = EvalRun(Answers(1), Answers(0), rows(range(10)), RlEvalConfig(pass_k=2, bootstrap_samples=50), RlConfig(),
                  [], {}, rows(range(20, 25)))
    report = evaluate_rl(run)
    assert report["num_problems"] == 10 and report["num_ood_problems"] == 5
    for split in ("test", "test_ood"):
        assert report[f"start/{split}/sample_accuracy"] == 0 and report[f"{split}/sample_accuracy"] == 1
        assert report[f"{split}/pass@2_delta_ci"] == (1.0, 1.0)
    without = evaluate_rl(EvalRun(Answers(1), Answers(0), rows(range(10)), RlEvalConfig(pass_k=2, bootstrap_samples=50),
                                  RlConfig(), [], {}))
    assert not any(k.startswith("test_ood/") or "ood" in k for k in without)
    assert {k: v for k, v in report.items() if "ood" not in k} == without  # the gated metrics do not change


def test_report_markdown_gives_ood_metrics_a_table_of_their_own():
    def metric(name, start, trained):
        return {name: trained, f"{name}_ci": (trained, trained), f"start/{name}": start, f"start/{name}_ci": (start, start),
                f"{name}_delta": trained - start, f"{name}_delta_ci": (trained - start, trained - start)}

    report = metric("test/sample_accuracy", 0.25, 0.5) | metric("test_ood/sample_accuracy", 0.0625, 0.125)
    lines = markdown(report).splitlines()
    ood = lines.index(next(line for line in lines if line.startswith("Out of distribution")))
    assert any(line.startswith("| test/sample_accuracy | 0.25 | 0.5 |") for line in lines[:ood])
    assert not any("test_ood" in line for line in lines[:ood])
    assert lines[ood + 2].startswith("| metric |") and lines[ood + 4].startswith("| test_ood/sample_accuracy | 0.0625 | 0.125 |")
    assert "Out of distribution" not in markdown(metric("test/sample_accuracy", 0.25, 0.5))


def _dataset_only(**dataset) -> tuple:
    config = {**TINY_RUN_CONFIG, "ops": {"math_rl__dataset": {"config": {"num_examples": 300, **dataset}}}}
    result = run_job("math_rl", config, raise_on_error=False, assets=["math_rl/dataset"])
    return result, {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_the_dataset_writes_test_ood_outside_training_and_the_check_covers_it(homes):
    result, checks = _dataset_only(generator="one_digit_problems", ood_generator="twenties_problems", ood_examples=200)
    assert result.success and checks["held_out_disjoint"].passed
    store = ArtifactStore()
    ref = store.latest("math_rl/dataset")
    splits = {s: [record_identity(r) for r in read_jsonl(ref.dir / f"{s}.jsonl")] for s in ("train", "test", "test_ood")}
    assert not set(splits["test_ood"]) & (set(splits["train"]) | set(splits["test"]))
    assert len(splits["test_ood"]) == len(set(splits["test_ood"])) == store.manifest(ref.fingerprint)["summary"]["test_ood_items"]
    sources = json.loads((ref.dir / "sources.json").read_text())
    assert sources["test_ood"][0].startswith("synthetic twenties_problems (seed 0): record ")

    # an "out-of-distribution" set that overlaps the training items is a leak, blocked and named
    result, checks = _dataset_only(generator="one_digit_problems", ood_generator="arithmetic_problems", ood_examples=200)
    assert not result.success and not checks["held_out_disjoint"].passed
    offending = checks["held_out_disjoint"].metadata["first_offending_records"].value
    assert offending and all(o.startswith("synthetic arithmetic_problems (seed 0): record ") for o in offending)
