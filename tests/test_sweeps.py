"""Sweeps: a bad spec fails before anything trains, naming its file and field; the report's
statistics equal their formulas on hand-computed cases; and, end to end on a tiny model, a
sweep trains each point once (a re-run trains nothing, a new seed trains only its points),
its points are Dagster partitions, and a dpo sweep reads one reference_logprobs artifact."""

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN_CONFIG
from crucible_assets.suites.assets import DEFAULT_SUITES, suite_stage
from crucible_assets.sweeps import report, spec as sweeps
from crucible_jobs import cli
from crucible_jobs.sweeps import check, read_spec
from resources.store.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
def tiny(run_config: dict, *recipes: str) -> dict:
    """`run_config` with only the ops a job over `recipes` has (a run config for another recipe's op is an error)."""
    prefixes = tuple(f"{r}__" for r in ("base", *recipes))
    return copy.deepcopy({"resources": run_config["resources"],  # a copy: tests change it, the shared config stays
                          "ops": {k: v for k, v in run_config["ops"].items() if k.startswith(prefixes)}})


def write_spec(tmp_path: Path, **fields) -> str:
    raw = {"name": "lr", "recipe": "sl_basic", "axes": {"learning_rate": [1e-3, 3e-3]}, "seeds": [0, 1]} | fields
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("fields,named", [
    ({"axes": {"learning_rat": [1e-3]}}, "axes.learning_rat: not a field of sl_basic's train config"),
    ({"axes": {"learning_rate": []}}, "axis 'learning_rate' has no values"),
    ({"axes": {"learning_rate": ["fast"]}}, "axes.learning_rate: Input should be a valid number"),
    ({"axes": {"batch_size": [0]}}, "axes.batch_size: Input should be greater than 0"),
    ({"axes": {"learning_rate": [1e-3, 2e-3, 3e-3]}, "seeds": [0, 1, 2], "max_points": 8}, "9 points"),
    ({"seeds": [0, 0]}, "seeds: Value error, a seed is repeated"),
    ({"lr": 1}, "lr: Extra inputs are not permitted"),
    ({"recipe": "sl_basics"}, "recipe: 'sl_basics' is not one of"),
    ({"axes": {"seed": [0, 1]}}, "seeds are swept with `seeds: [0, 1, 2]`"),
    ({"axes": {"learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}}}, "a grid needs lists of values"),
    ({"base": {"ops": {"sl_basic__checkpoint": {"config": {"max_step": 5}}}}}, "base.ops.sl_basic__checkpoint.config.max_step: not a field"),
    ({"base": {"ops": {"sl_basic__dataset": {"config": {"num_exampels": 5}}}}}, "unexpected config entry \"num_exampels\""),
])
def test_bad_spec_fails_before_training_naming_the_field(homes, tmp_path, capsys, fields, named):
    path = write_spec(tmp_path, **fields)
    assert cli.main(["sweep", "run", path]) == 2
    err = capsys.readouterr().err
    assert path in err and named in err, err
    assert not homes[0].exists()  # nothing stored: no sweep file, no store


def test_points_are_named_by_their_values_and_random_search_is_seeded():
    grid = sweeps.parse({"name": "s", "recipe": "sl_basic", "axes": {"learning_rate": [1e-3, 1e-5], "lr_schedule": ["cosine"]},
                         "seeds": [0, 1]}, "x")
    assert list(sweeps.points(grid)) == ["s.learning_rate-0.001.lr_schedule-cosine.seed-0",
                                         "s.learning_rate-0.001.lr_schedule-cosine.seed-1",
                                         "s.learning_rate-1e-05.lr_schedule-cosine.seed-0",
                                         "s.learning_rate-1e-05.lr_schedule-cosine.seed-1"]
    raw = {"name": "r", "recipe": "sl_basic", "search": "random", "samples": 5,
           "axes": {"learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}, "batch_size": [8, 16]}}
    drawn = sweeps.configurations(sweeps.parse(raw, "x"))
    assert drawn == sweeps.configurations(sweeps.parse(raw, "x")) and len(drawn) == 5
    assert all(1e-4 <= c["learning_rate"] <= 1e-2 and c["batch_size"] in (8, 16) for c in drawn)
    assert drawn != sweeps.configurations(sweeps.parse(raw | {"search_seed": 1}, "x"))


def test_t_test_equals_its_formula():
    """[1, 2, 3]: mean 2, sd 1, t = 2 / (1 / sqrt 3); with 2 degrees of freedom the t
    distribution's tail has the closed form P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, and its
    97.5% quantile is 4.302653 (tables)."""
    result = report.t_test([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert result["mean"] == 2.0
    assert result["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    half = 4.302653 / math.sqrt(3)
    assert result["ci"] == pytest.approx([2 - half, 2 + half], rel=1e-6)
    assert report.t_test([5.0]) is None


def fake_report(value: float, start: float = 3.0) -> dict:
    return {"test/nll": value, "test/nll_ci": [value - 0.1, value + 0.1], "start/test/nll": start,
            "start/test/nll_ci": [start - 0.1, start + 0.1], "test/nll_delta": value - start,
            "test/nll_delta_ci": [value - start - 0.1, value - start + 0.1]}


def test_best_configuration_is_tested_against_the_runner_up_with_bonferroni():
    """Three configurations (lower NLL is better), three seeds each. The best beats the
    runner-up by 0.1, 0.2, 0.3 over the seeds: t = 0.2 / (0.1 / sqrt 3), p = 0.0742 > 0.05 / 2,
    so not significant; against the worst it wins by a mile."""
    spec = sweeps.parse({"name": "s", "recipe": "sl_basic", "axes": {"learning_rate": [1, 2, 3]}, "seeds": [0, 1, 2]}, "x")
    values = {1: [1.0, 1.0, 1.0], 2: [1.1, 1.2, 1.3], 3: [2.5, 2.6, 2.7]}
    reports = {sweeps.point_name(spec, {"learning_rate": lr, "seed": s}): fake_report(v)
               for lr, vs in values.items() for s, v in zip(spec.seeds, vs)}
    missing = sweeps.point_name(spec, {"learning_rate": 3, "seed": 2})
    del reports[missing]
    summary = report.summarize(spec, reports, "test/nll", higher_is_better=False)
    assert [g["configuration"] for g in summary["configurations"]] == ["learning_rate=1", "learning_rate=2", "learning_rate=3"]
    assert summary["missing"] == [missing]
    best = summary["best"]
    runner_up, worst = best["comparisons"]
    assert runner_up["advantage"]["mean"] == pytest.approx(0.2)
    assert runner_up["advantage"]["p"] == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-6)
    assert best["significant_over_runner_up"] is False and "Bonferroni over 2" in best["correction"]
    assert worst["seeds"] == [0, 1] and worst["advantage"]["mean"] == pytest.approx(1.55)
    assert summary["configurations"][0]["gain"]["mean"] == pytest.approx(-2.0)
    assert "not significant" in report.verdict(summary)


def sweep_manifests(home: Path, stage: str) -> set[str]:
    found = set()
    for path in (home / "store" / "manifests").glob("*.json"):
        if json.loads(path.read_text())["key"].split("/")[:2] == stage.split("/"):
            found.add(path.stem)
    return found


@pytest.mark.slow
def test_sweep_trains_each_point_once_and_reports_the_best(homes, tmp_path, capsys):
    from dagster import AssetKey, DagsterInstance

    base = tiny(TINY_RUN_CONFIG, "sl_basic")
    base["ops"]["sl_basic__checkpoint"]["config"] |= {"max_steps": 20, "eval_every": 10, "save_every": 10}
    path = write_spec(tmp_path, base=base, axes={"learning_rate": [3e-4, 3e-3]})
    assert cli.main(["sweep", "run", path]) == 0
    home = homes[0]
    first = sweep_manifests(home, "sl_basic/sweep_checkpoint")
    assert len(first) == 4 and len(sweep_manifests(home, "sl_basic/tokenized")) == 1
    assert "best: learning_rate=0.003" in capsys.readouterr().out  # the CLI prints the report
    best = _report(home)["best"]
    assert best["values"] == {"learning_rate": 3e-3}  # 20 steps: the larger rate gets much further
    gap = best["comparisons"][0]["advantage"]
    assert gap["ci"][0] > 0.2, gap  # nats per token, across seeds: far from a coin flip

    before = {p.name for p in (home / "store" / "manifests").iterdir()}
    assert cli.main(["sweep", "run", path]) == 0  # trains nothing: no new artifact at all
    assert {p.name for p in (home / "store" / "manifests").iterdir()} == before

    assert cli.main(["sweep", "run", write_spec(tmp_path, base=base, axes={"learning_rate": [3e-4, 3e-3]}, seeds=[0, 1, 2])]) == 0
    assert len(sweep_manifests(home, "sl_basic/sweep_checkpoint") - first) == 2  # only the two seed-2 points
    assert len(_report(home)["points"]) == 6
    dagster = DagsterInstance.get()  # the UI's view: every point a partition, the report's plot inline
    assert set(dagster.get_dynamic_partitions("sl_basic_sweep_points")) == set(sweeps.points(read_spec(path)))
    shown = dagster.get_latest_materialization_event(AssetKey(["sl_basic", "sweep_report"])).asset_materialization.metadata
    assert "data:image/png;base64," in shown["metric_by_axis"].value and "best: learning_rate=0.003" in shown["verdict"].value
    assert cli.main(["sweep", "report", "lr", "--json"]) == 0

    trained = {p.name for p in (home / "store" / "manifests").iterdir()}
    assert cli.main(["sweep", "register", "lr"]) == 0  # through sl_basic's own gate, without retraining
    best_point = sweeps.point_name(read_spec(path), {"learning_rate": 3e-3, "seed": 0})
    new = [json.loads((home / "store" / "manifests" / name).read_text())["key"]
           for name in {p.name for p in (home / "store" / "manifests").iterdir()} - trained]
    suites = [f"sl_basic/{suite_stage(s)}" for s in DEFAULT_SUITES]  # the card's eval suites are built for the chosen point
    assert sorted(new) == sorted(["sl_basic/champion_eval", "sl_basic/registered_model", *suites])  # no checkpoint, no eval report
    (version,) = ModelRegistry().models()["sl_basic"]["versions"]
    assert version["lineage"]["sweep"] == {"name": "lr", "point": best_point}


def _report(home: Path) -> dict:
    ref = json.loads((home / "store" / "refs" / "sl_basic" / "sweep_report" / "lr.json").read_text())
    return json.loads((home / "store" / "objects" / ref["content_hash"] / "report.json").read_text())


@pytest.mark.slow
def test_dpo_sweep_reads_one_reference_logprobs_artifact(homes, tmp_path):
    from test_dpo_job import tiny_dpo_config

    path = write_spec(tmp_path, name="beta", recipe="dpo", base=tiny(tiny_dpo_config(), "sl_basic", "chat_sl", "dpo"), axes={"beta": [0.1, 0.5]}, seeds=[0])
    assert cli.main(["sweep", "run", path]) == 0
    home = homes[0]
    (reference,) = sweep_manifests(home, "dpo/reference_logprobs")
    points = sweep_manifests(home, "dpo/sweep_checkpoint")
    assert len(points) == 2
    for fp in points:
        upstream = json.loads((home / "store" / "manifests" / f"{fp}.json").read_text())["upstream"]
        assert reference in {u["fingerprint"] for u in upstream}


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_example_sweep_specs_are_valid(path):
    points = check(read_spec(str(path)), path.name)
    assert len(points) >= 6


def launch_from_launchpad(spec_path: str):
    from dagster import DagsterInstance

    from crucible_jobs import defs

    return defs.resolve_job_def("sweep").execute_in_process(
        run_config={"ops": {"run_sweep": {"config": {"spec": spec_path}}}}, instance=DagsterInstance.get(), raise_on_error=False)


def test_launchpad_sweep_job_refuses_a_bad_spec_naming_the_field(homes, tmp_path):
    result = launch_from_launchpad(write_spec(tmp_path, axes={"learning_rat": [1e-3]}))
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "axes.learning_rat: not a field of sl_basic's train config" in failure.event_specific_data.error.cause.message
    assert not homes[0].exists()


@pytest.mark.slow
def test_launchpad_sweep_job_runs_every_point_and_the_report(homes, tmp_path):
    base = tiny(TINY_RUN_CONFIG, "sl_basic")
    base["ops"]["sl_basic__checkpoint"]["config"] = {"max_steps": 6, "eval_every": 3, "save_every": 3}
    assert launch_from_launchpad(write_spec(tmp_path, base=base, seeds=[0])).success
    assert len(_report(homes[0])["points"]) == 2
