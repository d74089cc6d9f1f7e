"""What the UI and the console show, without a run: eval tables, artifact metadata, curves, progress lines."""

import json

import pytest

from dagster import TableMetadataValue

from crucible_assets import plots
from crucible_assets.evaluation import COMPARISON_COLUMNS, comparison_rows, markdown
from crucible_assets.train.progress import ProgressLog, bar
from crucible_assets.ui_metadata import to_metadata
from resources.store.artifact_store import ArtifactRef

# Full-precision floats, as report.json holds them; bits_per_byte has neither CI nor paired gain.
REPORT = {"test/nll": 1.5123456789, "test/nll_ci": (1.40123456789, 1.6098765432), "start/test/nll": 2.0,
          "start/test/nll_ci": (1.9, 2.1), "test/nll_delta": -0.48765432101, "test/nll_delta_ci": (-0.6000049, -0.00012345678),
          "test/bits_per_byte": 0.70000000000000007, "start/test/bits_per_byte": 0.91234567, "num_examples": 60,
          "num_target_tokens": 123456789}


def test_eval_report_metadata_has_a_comparison_table_numbers_and_paths(tmp_path):
    (tmp_path / "report.md").write_text("# r\n")
    ref = ArtifactRef(key="x/eval_report", fingerprint="f" * 32, content_hash="c" * 64, path=str(tmp_path))
    meta = to_metadata(ref, REPORT, cached=False, code_version="2")
    table = meta["eval_table"]
    assert isinstance(table, TableMetadataValue)
    assert [c.name for c in table.schema.columns] == list(COMPARISON_COLUMNS) \
        == ["metric", "start", "trained", "trained_ci", "gain", "gain_ci", "verdict"]
    rows = {r.data["metric"]: r.data for r in table.records}
    assert set(rows) == {"test/nll", "test/bits_per_byte"}  # every compared metric, none left out
    assert rows["test/nll"] == {"metric": "test/nll", "start": 2.0, "trained": 1.512, "trained_ci": "[1.401, 1.61]",
                                "gain": -0.4877, "gain_ci": "[-0.6, -0.0001235]", "verdict": "better"}
    assert list(rows["test/nll"]) == list(COMPARISON_COLUMNS)
    # no CI and no paired gain in the report: shown as n/a, not invented, not dropped
    assert rows["test/bits_per_byte"] == {"metric": "test/bits_per_byte", "start": 0.9123, "trained": 0.7,
                                          "trained_ci": "n/a", "gain": "n/a", "gain_ci": "n/a", "verdict": "n/a"}
    assert meta["code_version"] == "2"
    assert meta["report_file"].path == str(tmp_path / "report.md")
    assert "model_dir" not in meta


def test_metadata_numbers_are_rounded_to_4_significant_digits_and_stay_numbers(tmp_path):
    """The Plots tab charts numeric metadata, so rounding keeps the type; ints stay exact; the
    summary itself (what report.json and metrics.jsonl hold) is not touched."""
    ref = ArtifactRef(key="x/eval_report", fingerprint="f" * 32, content_hash="c" * 64, path=str(tmp_path))
    summary = REPORT | {"train_mean_nll": 0.000123456789, "tokens_per_s": 8123.456, "flag": True, "name": "a"}
    before = json.dumps(summary, sort_keys=True)
    meta = to_metadata(ref, summary, cached=False, code_version="2")
    assert json.dumps(summary, sort_keys=True) == before
    assert meta["test/nll"] == 1.512 and type(meta["test/nll"]) is float
    assert meta["test/nll_delta"] == -0.4877 and meta["test/bits_per_byte"] == 0.7
    assert meta["train_mean_nll"] == 0.0001235 and meta["tokens_per_s"] == 8123.0
    assert meta["num_examples"] == 60 and meta["num_target_tokens"] == 123456789  # ints exact, not 1.235e8
    assert type(meta["num_target_tokens"]) is int and meta["flag"] is True and meta["name"] == "a"
    assert meta["test/nll_ci"].value == [1.401, 1.61]  # JSON values' floats too, still numbers


def test_report_markdown_has_the_ui_table_columns_and_n_a():
    md = markdown(REPORT)
    lines = md.splitlines()
    assert lines[0] == "| metric | start | trained | 95% CI (trained) | gain | 95% CI (gain) | verdict |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2] == "| test/bits_per_byte | 0.9123 | 0.7 | n/a | n/a | n/a | n/a |"
    assert lines[3] == "| test/nll | 2 | 1.512 | [1.401, 1.61] | -0.4877 | [-0.6, -0.0001235] | better |"
    assert lines[4] == ""
    assert markdown(REPORT) == md  # deterministic: report.md's bytes are a function of the report


def _gained(metric: str, gain_ci: tuple[float, float]) -> dict:
    return {metric: 0.5, f"start/{metric}": 0.5, f"{metric}_delta": sum(gain_ci) / 2, f"{metric}_delta_ci": gain_ci}


@pytest.mark.parametrize("metric,gain_ci,expected", [
    ("test/accuracy", (0.01, 0.05), "better"), ("test/accuracy", (-0.09, -0.015), "worse"),
    ("test/accuracy", (-0.02, 0.03), "no clear change"), ("test/accuracy", (0.0, 0.04), "no clear change"),
    ("test/nll", (-0.3, -0.1), "better"), ("test/nll", (0.02, 0.1), "worse"), ("test/teacher_kl", (0.1, 0.2), "worse"),
    ("test/dpo_loss", (-0.2, -0.1), "better"), ("test/pref_accuracy", (-0.055, -0.005), "worse"),
])
def test_every_metric_that_got_worse_is_marked_in_the_table(metric, gain_ci, expected):
    """A regression hides nowhere: a gain whose CI excludes zero in the bad direction (lower
    accuracy, higher NLL or KL) reads "worse", in the UI table and report.md alike."""
    report = _gained(metric, gain_ci)
    assert comparison_rows(report)[0]["verdict"] == expected
    assert markdown(report).splitlines()[2].endswith(f"| {expected} |")


def test_checkpoint_plots_reward_and_kl_curves_only_when_the_rows_carry_them(tmp_path):
    sft = [{"step": i, "train_mean_nll": 2.0 - i / 10} for i in range(5)]
    assert plots.extra_curves(sft, tmp_path) == []
    rl = [{"step": i, "env/all/reward/total": i / 5, "optim/kl_sample_train_v1": 0.01 * i} for i in range(5)]
    assert plots.extra_curves(rl, tmp_path) == ["reward_curve.png", "kl_curve.png"]
    assert (tmp_path / "kl_curve.png").read_bytes().startswith(b"\x89PNG")
    ref = ArtifactRef(key="x/checkpoint", fingerprint="f" * 32, content_hash="c" * 64, path=str(tmp_path))
    meta = to_metadata(ref, {"plots": ["kl_curve.png"]}, cached=True, code_version="1")
    assert meta["kl_curve"].value.startswith("![kl_curve.png](data:image/png;base64,")


def test_progress_lines_come_at_a_steady_wall_clock_cadence():
    """A fake clock: steps of 1 s with every_s=5 log the first step, then five seconds after the
    previous line, and the last."""
    now = [0.0]
    lines: list[str] = []
    progress = ProgressLog(total=12, start=0, log=lines.append, every_s=5.0, clock=lambda: now[0])
    for done in range(1, 13):
        now[0] += 1.0
        progress.step(done, tokens=100, metrics={"loss": 1.0 / done, "test/nll": 2.0, "grad_norm": 3.0}, loss_key="loss")
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/12", "6/12", "11/12", "12/12"]
    assert lines[1].startswith(bar(6, 12)) and lines[1].startswith("[##########----------]  50%")
    assert "loss 0.1667 test/nll 2.0000 100 tok/s eta 6s" in lines[1]
    assert "grad_norm" not in json.dumps(lines)


def test_docs_recipes_names_every_config_field_of_every_recipe():
    """docs/recipes.md is the reference a newcomer reads; a field added in code shows up there."""
    from pathlib import Path

    from crucible_jobs import defs
    from recipes import RECIPES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    missing = set()
    for recipe in RECIPES:
        assert f"## {recipe.name}" in doc
        for node in defs.resolve_job_def(recipe.name).graph.nodes:
            schema = node.definition.config_schema
            fields = schema.as_field().config_type.fields if schema and schema.as_field().config_type.kind.name == "STRICT_SHAPE" else {}
            missing |= {name for name in fields if f"`{name}`" not in doc}
    assert not missing, f"docs/recipes.md does not describe: {sorted(missing)}"
