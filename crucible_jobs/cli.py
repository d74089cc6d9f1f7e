"""`crucible` command line: lineage, audit and registry listings, read straight from the
artifact store's manifests and the registry (no Dagster instance needed)."""

from __future__ import annotations

import argparse
import json
import sys

from resources.artifact_store import ArtifactRef, ArtifactStore
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
    failures, seen = 0, set()
    for node in walk(lineage(resolve(args.target, store, registry), store)):
        if node.get("fingerprint", node["data_version"]) in seen:
            continue
        seen.add(node.get("fingerprint", node["data_version"]))
        if node.get("missing"):
            print(f"MISSING {node['key']} {node['data_version']}")
            failures += 1
            continue
        ref = ArtifactRef(key=node["key"], fingerprint=node["fingerprint"], content_hash=node["data_version"], path=node["path"])
        bad = store.verify(ref)
        failures += bool(bad)
        print(f"{'OK     ' if not bad else 'FAILED '}{node['key']} {node['data_version']}" + "".join(f"\n    mismatch: {ref.path}/{f}" for f in bad))
    print("audit passed" if not failures else f"audit failed: {failures} artifact(s) do not match their manifests")
    return 1 if failures else 0


def cmd_models(args, store, registry) -> int:
    for name, model in sorted(registry.models().items()):
        aliases = {}
        for alias, v in model["aliases"].items():
            aliases.setdefault(v, []).append(alias)
        print(name)
        for v in model["versions"]:
            metric = v["metrics"].get("test/nll")
            tag = ",".join(sorted(aliases.get(v["version"], [])))
            print(f"  v{v['version']:<3} {tag:<16} test/nll={metric if metric is None else round(metric, 4)}  data_version={v['content_hash']}  run={v['run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible", description="Lineage, audits and the model registry of a Crucible store ($CRUCIBLE_HOME).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lineage", help="upstream tree of an asset or registered model")
    p.add_argument("target", help="asset key (sl_basic/registered_model) or model (sl_basic, sl_basic@champion, sl_basic:1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("audit", help="re-hash every artifact in the lineage against its manifest")
    p.add_argument("target")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("models", help="registry versions and aliases")
    p.set_defaults(fn=cmd_models)
    args = parser.parse_args(argv)
    try:
        return args.fn(args, ArtifactStore(), ModelRegistry())
    except (KeyError, FileNotFoundError) as e:
        print(f"crucible: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
