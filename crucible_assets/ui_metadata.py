"""What the Dagster UI shows for a materialization, rendered from an artifact's summary:
numbers as numeric metadata (so the Plots tab charts them across materializations; floats at
4 significant digits, ints exact; display only: report.json and metrics.jsonl keep every
digit), plots as inline PNG markdown, an eval report's comparison as a table, and the
artifact's paths."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from crucible_assets.evaluation import comparison_rows, sig4
from resources.store.artifact_store import ArtifactRef

# Well-known parts of an artifact dir, shown as clickable paths when present.
ARTIFACT_PATHS = {"model": "model_dir", "state": "state_dir", "metrics.jsonl": "metrics_file",
                  "report.md": "report_file", "train.parquet": "train_shard", "test.parquet": "test_shard"}

# evaluation.COMPARISON_COLUMNS, in order: seven narrow columns (numbers at 4 significant
# digits, CIs as short strings) that fit a 1600 px window.
COMPARISON_SCHEMA = TableSchema(columns=[
    TableColumn("metric", "string"),
    TableColumn("start", "float", description="starting model"),
    TableColumn("trained", "float", description="trained model"),
    TableColumn("trained_ci", "string", description="95% bootstrap CI of trained; n/a where not reported"),
    TableColumn("gain", "float", description="trained - start, paired; n/a where not reported"),
    TableColumn("gain_ci", "string", description="95% paired bootstrap CI of gain; n/a where not reported"),
    TableColumn("verdict", "string", description="better or worse where the gain's CI excludes zero, else no clear change"),
])


def comparison_table(summary: dict) -> MetadataValue | None:
    rows = comparison_rows(summary)
    if not rows:
        return None
    return MetadataValue.table(records=[TableRecord(r) for r in rows],
                               schema=COMPARISON_SCHEMA)


def rounded(v: Any) -> Any:
    """Floats (also inside lists and dicts) at 4 significant digits, still numbers; ints,
    bools and strings as they are."""
    if isinstance(v, float):
        return sig4(v)
    if isinstance(v, (list, tuple)):
        return [rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    return v


def png_markdown(path: Path) -> MetadataValue:
    png = base64.b64encode(path.read_bytes()).decode()
    return MetadataValue.md(f"![{path.name}](data:image/png;base64,{png})")


def to_metadata(ref: ArtifactRef, summary: dict, cached: bool, code_version: str) -> dict[str, Any]:
    """`code_version`: the asset code version that built these bytes (a cache hit's may be older)."""
    meta: dict[str, Any] = {
        "code_version": code_version,
        "data_version": ref.content_hash,
        "fingerprint": ref.fingerprint,
        "path": MetadataValue.path(ref.path),
        "cached": cached,
    }
    for name, label in ARTIFACT_PATHS.items():
        if (ref.dir / name).exists():
            meta[label] = MetadataValue.path(str(ref.dir / name))
    if (table := comparison_table(summary)) is not None:
        meta["eval_table"] = table
    for k, v in summary.items():
        if k == "plots":
            for name in v:
                meta[Path(name).stem] = png_markdown(ref.dir / name)
        elif isinstance(v, (int, float, str, bool)):
            meta[k] = rounded(v)
        else:
            meta[k] = MetadataValue.json(rounded(v))
    return meta
