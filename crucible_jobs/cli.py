"""`crucible` command line: lineage, audit (and reproduction), run comparison and the
registry (listing, promote, rollback), read straight from the artifact store's manifests
and the registry (no Dagster instance needed; a reproduction runs Dagster in a subprocess)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from crucible_jobs import reproduce
from resources.artifact_store import ArtifactRef, ArtifactStore
from resources.cpu import cpu_model
from resources.registry import ModelRegistry


def resolve(target: str, store: ArtifactStore, registry: ModelRegistry) -> ArtifactRef:
    """An asset key (`sl_basic/registered_model`) or a model (`sl_basic`, `sl_basic@champion`, `sl_basic:2`)."""
    if "/" in target:
        return store.latest(target)
    entry = registry.resolve(target)
    ref = store.lookup(entry["fingerprint"])
    if ref is None:
        raise FileNotFoundError(f"registry entry {target} points at fingerprint {entry['fingerprint']}, missing from the store")
    return ref


def lineage(ref: ArtifactRef, store: ArtifactStore, seen: set[str] | None = None) -> dict:
    """The upstream tree; an artifact reached a second time (chains share ancestors) is a
    stub marked `shown_above`, so the tree stays linear in the size of the graph."""
    seen = set() if seen is None else seen
    m = store.manifest(ref.fingerprint)
    if ref.fingerprint in seen:
        return {"key": m["key"], "data_version": m["content_hash"], "fingerprint": ref.fingerprint, "shown_above": True, "upstream": []}
    seen.add(ref.fingerprint)
    upstream = []
    for u in m["upstream"]:
        up = store.lookup(u["fingerprint"])
        upstream.append(lineage(up, store, seen) if up else {"key": u["key"], "data_version": u["content_hash"], "missing": True, "upstream": []})
    return {
        "key": m["key"],
        "data_version": m["content_hash"],
        "fingerprint": m["fingerprint"],
        "code_version": m["code_version"],
        "config": m["config"],
        "extra_inputs": m.get("extra_inputs"),
        "backend": m.get("backend"),
        "run_id": m["run_id"],
        "path": ref.path,
        "upstream": upstream,
    }


def walk(node: dict):
    yield node
    for u in node["upstream"]:
        yield from walk(u)


def print_tree(node: dict, indent: str = "") -> None:
    if node.get("shown_above"):
        print(f"{indent}{node['key']}  data_version={node['data_version']}  (shown above)")
        return
    print(f"{indent}{node['key']}  data_version={node['data_version']}  code_version={node.get('code_version')}  run={node.get('run_id')}")
    if "path" in node:
        print(f"{indent}    path: {node['path']}")
        print(f"{indent}    config: {json.dumps(node['config'], sort_keys=True)}")
    for u in node["upstream"]:
        print_tree(u, indent + "  ")


def cmd_lineage(args, store, registry) -> int:
    tree = lineage(resolve(args.target, store, registry), store)
    if args.json:
        print(json.dumps(tree, indent=1, sort_keys=True))
    else:
        print_tree(tree)
    return 0


def cmd_audit(args, store, registry) -> int:
    ref = resolve(args.target, store, registry)
    failures, seen = 0, set()
    for node in walk(lineage(ref, store)):
        if node.get("fingerprint", node["data_version"]) in seen:
            continue
        seen.add(node.get("fingerprint", node["data_version"]))
        if node.get("missing"):
            print(f"MISSING {node['key']} {node['data_version']}")
            failures += 1
            continue
        artifact = ArtifactRef(key=node["key"], fingerprint=node["fingerprint"], content_hash=node["data_version"], path=node["path"])
        bad = store.verify(artifact)
        failures += bool(bad)
        print(f"{'OK     ' if not bad else 'FAILED '}{node['key']} {node['data_version']}" + "".join(f"\n    mismatch: {artifact.path}/{f}" for f in bad))
    print("audit passed" if not failures else f"audit failed: {failures} artifact(s) do not match their manifests")
    if args.reproduce:
        return max(1 if failures else 0, reproduce_chain(ref, store, args.scratch, args.keep))
    return 1 if failures else 0


def reproduce_chain(ref: ArtifactRef, store: ArtifactStore, scratch_dir: str | None, keep: bool) -> int:
    ancestry = store.ancestry(ref.fingerprint)
    job = ref.key.split("/")[0]
    scratch = Path(scratch_dir) if scratch_dir else Path(tempfile.mkdtemp(prefix="crucible-reproduce-"))
    print(f"re-materializing job {job} ({len(ancestry)} artifacts) into scratch {scratch}")
    started = time.time()
    ok, log = reproduce.rematerialize(job, reproduce.run_config(ancestry), scratch)
    rows = reproduce.compare(ancestry, ArtifactStore(root=str(scratch / "crucible" / "store")))
    for row in rows:
        print(f"{row['status'].upper():<15}{row['key']} {row['data_version']}"
              + (f" -> {row['reproduced']}" if row.get("reproduced", row["data_version"]) != row["data_version"] else "")
              + "".join(f"\n    changed: {c}" for c in row.get("changed", []))
              + "".join(f"\n    file differs: {f}" for f in row.get("files", [])))
    first = next((r for r in rows if r["status"] != "identical"), None)
    if first is None:
        print(f"reproduce passed: all {len(rows)} data versions bit-identical on this machine ({machine_type()}) "
              f"in {time.time() - started:.0f} s")
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    cause = first.get("changed") or first.get("files") or [f"the run stopped before it (log: {log})"]
    print(f"reproduce failed: first asset that differs: {first['key']} ({first['status']}): {cause[0]}")
    if not ok:
        print(f"the scratch run failed; its log: {log}")
    return 1


def machine_type() -> str:
    """What "same machine type" means for a bit-identical claim: architecture, CPU model, cores."""
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores"


def cmd_models(args, store, registry) -> int:
    for name, model in sorted(registry.models().items()):
        aliases = {}
        for alias, v in model["aliases"].items():
            aliases.setdefault(v, []).append(alias)
        print(name)
        for v in model["versions"]:
            metric = v.get("gate", {}).get("metric", "test/nll")
            value = v["metrics"].get(metric)
            tag = ",".join(sorted(aliases.get(v["version"], [])))
            decision = v.get("decision")
            verdict = "" if decision is None else f"  gate: {'passed' if decision['passed'] else 'failed'}"
            print(f"  v{v['version']:<3} {tag:<24} {metric}={value if value is None else round(value, 4)}{verdict}"
                  f"  data_version={v['content_hash']}  run={v['run_id']}")
    return 0


def cmd_promote(args, store, registry) -> int:
    entry = registry.promote(args.spec, args.alias, args.reason, who=args.by)
    print(f"{args.alias} -> {args.spec.split('@')[0].split(':')[0]} v{entry['version']}")
    return 0


def cmd_rollback(args, store, registry) -> int:
    version = registry.rollback(args.name, args.alias, args.reason, who=args.by)
    print(f"{args.alias} -> {args.name} v{version}")
    return 0


def cmd_compare(args, store, registry) -> int:
    a, b = registry.resolve(args.a), registry.resolve(args.b)
    print(f"{'metric':<32}{args.a:>14}{args.b:>14}{'b - a':>12}  95% CI of b - a")
    for metric in sorted(k for k in set(a["metrics"]) & set(b["metrics"]) if not k.startswith("start/")):
        va, vb = a["metrics"][metric], b["metrics"][metric]
        ci = difference_ci(vb - va, a.get("metric_cis", {}).get(metric), b.get("metric_cis", {}).get(metric))
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        print(f"{metric:<32}{va:>14.4f}{vb:>14.4f}{vb - va:>+12.4f}  {ci_text}")
    configs = [chain_configs(store, e) for e in (a, b)]
    changes = list(reproduce.diff(*configs))
    print("\nconfig diff (asset.field: a -> b; a model's own stages without its recipe prefix):" if changes else "\nconfigs identical")
    for path, va, vb in changes:
        print(f"  {path.lstrip('.')}: {va!r} -> {vb!r}")
    data = list(reproduce.diff(a.get("data_hashes", {}), b.get("data_hashes", {})))
    for path, va, vb in data:
        print(f"  data {path.lstrip('.')}: {va} -> {vb}")
    return 0


def chain_configs(store: ArtifactStore, entry: dict) -> dict:
    """Config of every artifact in a model's chain; its own recipe's stages are keyed by
    stage alone, so two recipes' models line up stage by stage."""
    own = entry["asset_key"].split("/")[0] + "/"
    return {m["key"].removeprefix(own): m["config"] for m in store.ancestry(entry["fingerprint"])}


def difference_ci(delta: float, ci_a: list | None, ci_b: list | None) -> tuple[float, float] | None:
    """CI of b - a for two independent evaluations (each model on its own test split), by a
    normal approximation from each model's 95% bootstrap CI."""
    if not ci_a or not ci_b:
        return None
    se = math.hypot((ci_a[1] - ci_a[0]) / (2 * 1.96), (ci_b[1] - ci_b[0]) / (2 * 1.96))
    return delta - 1.96 * se, delta + 1.96 * se


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible", description="Lineage, audits and the model registry of a Crucible store ($CRUCIBLE_HOME).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lineage", help="upstream tree of an asset or registered model")
    p.add_argument("target", help="asset key (sl_basic/registered_model) or model (sl_basic, sl_basic@champion, sl_basic:1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("audit", help="re-hash every artifact in the lineage against its manifest")
    p.add_argument("target")
    p.add_argument("--reproduce", action="store_true",
                   help="also re-materialize the whole chain into a scratch store and compare data versions")
    p.add_argument("--scratch", help="scratch directory (default: a new temp dir, removed when the reproduction passes)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory after a passing reproduction")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("models", help="registry versions and aliases; promote/rollback move an alias by hand")
    p.set_defaults(fn=cmd_models)
    moves = p.add_subparsers(dest="move")
    for move, target, fn in (("promote", "spec", cmd_promote), ("rollback", "name", cmd_rollback)):
        m = moves.add_parser(move, help=f"{move} an alias (recorded in the registry's audit log)")
        m.add_argument(target, help="model version (sl_basic:2, sl_basic@staging)" if target == "spec" else "model name")
        m.add_argument("--reason", required=True, help="why (recorded)")
        m.add_argument("--alias", default="champion", help="alias to move (champion, staging, latest)")
        m.add_argument("--by", default=None, help="who (default: the current user)")
        m.set_defaults(fn=fn)
    p = sub.add_parser("compare", help="two registered models: metrics side by side with the difference and its CI; config diff")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=cmd_compare)
    args = parser.parse_args(argv)
    try:
        return args.fn(args, ArtifactStore(), ModelRegistry())
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"crucible: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
