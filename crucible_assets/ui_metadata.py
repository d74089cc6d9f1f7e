"""What the Dagster UI shows for a materialization, rendered from an artifact's summary:
numbers as numeric metadata (so the Plots tab charts them across materializations), plots
as inline PNG markdown, an eval report's comparison as a table, and the artifact's paths."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from crucible_assets.evaluation import comparison_rows
from resources.store.artifact_store import ArtifactRef

# Well-known parts of an artifact dir, shown as clickable paths when present.
ARTIFACT_PATHS = {"model": "model_dir", "state": "state_dir", "metrics.jsonl": "metrics_file",
                  "report.md": "report_file", "train.parquet": "train_shard", "test.parquet": "test_shard"}

COMPARISON_SCHEMA = TableSchema(columns=[
    TableColumn("metric", "string"), TableColumn("value", "float", description="trained model"),
    TableColumn("ci", "string", description="95% bootstrap CI of value"),
    TableColumn("start", "float", description="starting model"),
    TableColumn("delta", "float", description="trained - start, paired"),
    TableColumn("delta_ci", "string", description="95% paired bootstrap CI of delta"),
])


def comparison_table(summary: dict) -> MetadataValue | None:
    rows = comparison_rows(summary)
    if not rows:
        return None
    return MetadataValue.table(records=[TableRecord(r) for r in rows],
                               schema=COMPARISON_SCHEMA)


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
            meta[k] = v
        else:
            meta[k] = MetadataValue.json(v)
    return meta
