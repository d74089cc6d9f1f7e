"""What the UI and the console show, without a run: eval tables, artifact metadata, curves, progress lines."""

import json

from dagster import TableMetadataValue

from crucible_assets import plots
from crucible_assets.train.progress import ProgressLog, bar
from crucible_assets.ui_metadata import to_metadata
from resources.store.artifact_store import ArtifactRef

REPORT = {"test/nll": 1.5, "test/nll_ci": (1.4, 1.6), "start/test/nll": 2.0, "start/test/nll_ci": (1.9, 2.1),
          "test/nll_delta": -0.5, "test/nll_delta_ci": (-0.6, -0.4),
          "test/bits_per_byte": 0.7, "start/test/bits_per_byte": 0.9, "num_examples": 60}


def test_eval_report_metadata_has_a_comparison_table_numbers_and_paths(tmp_path):
    (tmp_path / "report.md").write_text("# r\n")
    ref = ArtifactRef(key="x/eval_report", fingerprint="f" * 32, content_hash="c" * 64, path=str(tmp_path))
    meta = to_metadata(ref, REPORT, cached=False, code_version="2")
    table = meta["eval_table"]
    assert isinstance(table, TableMetadataValue)
    rows = {r.data["metric"]: r.data for r in table.records}
    assert set(rows) == {"test/nll", "test/bits_per_byte"}
    assert rows["test/nll"] == {"metric": "test/nll", "value": 1.5, "ci": "[1.4000, 1.6000]", "start": 2.0,
                                "delta": -0.5, "delta_ci": "[-0.6000, -0.4000]"}
    assert rows["test/bits_per_byte"]["delta"] is None  # no paired delta reported: left empty, not invented
    assert meta["code_version"] == "2"
    assert meta["test/nll"] == 1.5 and meta["num_examples"] == 60  # plain numbers: the Plots tab charts them
    assert meta["report_file"].path == str(tmp_path / "report.md")
    assert "model_dir" not in meta


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
