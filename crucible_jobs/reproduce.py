"""`crucible audit --reproduce`: re-materialize a model's whole chain into a scratch store
(its own CRUCIBLE_HOME and DAGSTER_HOME) with the run config its manifests recorded, then
compare data versions artifact by artifact, upstream first. Identical bytes prove the
chain reproduces on this machine type; otherwise the first artifact that differs is the one
to blame, and its manifest says which input changed (a config field, a code version, an
upstream data version, a source file's records hash, the backend)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from resources.store import lineage
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.compare import diff


@dataclass
class Reproduction:
    """What one reproduction found; the command decides how to report it."""

    ok: bool  # the scratch run itself succeeded; rows may still differ when it did
    log: Path
    rows: list[dict]
    seconds: float

    @property
    def first_difference(self) -> dict | None:
        """The artifact to blame: upstream of every other that differs."""
        return next((r for r in self.rows if r["status"] != "identical"), None)


def plan(ref: ArtifactRef, store: ArtifactStore, scratch_dir: str | None) -> tuple[str, list[dict], Path]:
    """The job that builds `ref`, its chain upstream first, and where to rebuild it (a new
    temporary directory unless one is given): known before the long run starts, so the
    caller can say what it is about to do."""
    chain = lineage.ancestry(store, ref.fingerprint)
    scratch = Path(scratch_dir) if scratch_dir else Path(tempfile.mkdtemp(prefix="crucible-reproduce-"))
    return ref.key.split("/")[0], chain, scratch


def reproduce_chain(job: str, chain: list[dict], scratch: Path, keep: bool) -> Reproduction:
    """Rebuilds the chain in the scratch and compares it artifact by artifact. A scratch that
    reproduced everything proves nothing more, so it is removed unless `keep`; one that
    differs is kept for its log and files."""
    started = time.time()
    ok, log = rematerialize(job, run_config(chain), scratch)
    rows = compare(chain, ArtifactStore(root=str(scratch / "crucible" / "store")))
    result = Reproduction(ok, log, rows, time.time() - started)
    if result.first_difference is None and not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def run_config(ancestry: list[dict]) -> dict:
    """The recorded config of every op in the chain that takes one, and the backend the
    chain was trained with. A manifest's config is the op's config except where an asset
    records something else (registered_model records its model and metric): those ops keep
    their defaults, which do not change their bytes."""
    from dagster import AssetKey

    from crucible_jobs import defs

    ops = {}
    for m in ancestry:
        fields = _config_fields(defs.get_assets_def(AssetKey(m["key"].split("/"))))
        if m["config"] and set(m["config"]) <= fields:
            ops[m["key"].replace("/", "__")] = {"config": m["config"]}
    return {"ops": ops, "resources": {"backend": {"config": backend_config(ancestry)}}}


def _config_fields(assets_def) -> set[str]:
    schema = assets_def.op.config_schema
    fields = getattr(getattr(schema, "config_type", None), "fields", None)
    return set(fields or ())


def backend_config(ancestry: list[dict]) -> dict:
    """Local-backend settings from the identity recorded by the nearest trained artifact."""
    identity = next((m["backend"] for m in reversed(ancestry) if m.get("backend")), None)
    if identity is None:
        return {}
    if identity.get("backend") != "local_torch":
        raise ValueError(f"cannot reproduce a chain trained on backend {identity.get('backend')!r} here: "
                         "only local_torch chains re-materialize offline")
    return {"kind": "local", "local": {k: identity[k] for k in ("device", "precision", "packing", "pack_length")}}


def rematerialize(job: str, config: dict, scratch: Path) -> tuple[bool, Path]:
    """Runs `job` in a fresh process against the scratch homes; returns (success, log)."""
    home, dagster_home = scratch / "crucible", scratch / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config_path, log = scratch / "run_config.yaml", scratch / "run.log"
    config_path.write_text(yaml.safe_dump(config, sort_keys=True))
    env = {**os.environ, "CRUCIBLE_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-m", "crucible_jobs", "-j", job,
                               "-c", str(config_path)], env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc.returncode == 0, log


def compare(ancestry: list[dict], scratch: ArtifactStore) -> list[dict]:
    """One row per original artifact: `identical`, `differs` (same inputs, other bytes:
    nondeterminism, with the files), `inputs_changed` (with what changed) or `not_rebuilt`."""
    rows = []
    for m in ancestry:
        row = {"key": m["key"], "data_version": m["content_hash"]}
        twin = scratch.lookup(m["fingerprint"])
        if twin is not None:
            row["reproduced"] = twin.content_hash
            if twin.content_hash == m["content_hash"]:
                row["status"] = "identical"
            else:
                files = scratch.manifest(m["fingerprint"])["files"]
                row |= {"status": "differs", "files": sorted(k for k in set(files) | set(m["files"]) if files.get(k) != m["files"].get(k))}
        else:
            try:
                rebuilt = scratch.manifest(scratch.latest(m["key"]).fingerprint)
            except FileNotFoundError:
                row["status"] = "not_rebuilt"
            else:
                row |= {"status": "inputs_changed", "reproduced": rebuilt["content_hash"], "changed": input_changes(m, rebuilt)}
        rows.append(row)
    return rows


def input_changes(original: dict, rebuilt: dict) -> list[str]:
    """What differs between two manifests' inputs, as `field: old -> new` lines."""
    changes = []
    for field in ("code_version", "config", "extra_inputs", "backend"):
        changes += [f"{field}{k}: {a!r} -> {b!r}" for k, a, b in diff(original.get(field), rebuilt.get(field))]
    before = {u["key"]: u["content_hash"] for u in original["upstream"]}
    after = {u["key"]: u["content_hash"] for u in rebuilt["upstream"]}
    changes += [f"upstream {k}: {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return changes
