"""The one walk of an artifact's lineage through the store's manifests. `crucible lineage`
shows it as a tree, whose JSON is a user contract (keys and stubs exactly as built here);
the reproduction, the model card and `crucible compare` need the same artifacts flat,
upstream first. Both come from one expansion so they cannot disagree about which
ancestors a chain has, or in which order."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.registry import ModelRegistry


def resolve(target: str, store: ArtifactStore, registry: ModelRegistry) -> ArtifactRef:
    """An asset key (`sl_basic/registered_model`) or a model (`sl_basic`, `sl_basic@champion`, `sl_basic:2`)."""
    if "/" in target:
        return store.latest(target)
    entry = registry.resolve(target)
    ref = store.lookup(entry["fingerprint"])
    if ref is None:
        raise FileNotFoundError(f"registry entry {target} points at fingerprint {entry['fingerprint']}, missing from the store")
    return ref


def lineage_tree(store: ArtifactStore, ref: ArtifactRef) -> dict:
    """The upstream tree; an artifact reached a second time (chains share ancestors) is a
    stub marked `shown_above`, so the tree stays linear in the size of the graph, and an
    upstream with no manifest in the store is a stub marked `missing`."""
    return _expand(store, ref, store.lookup, set(), {})


def ancestry(store: ArtifactStore, fp: str) -> list[dict]:
    """Manifests of an artifact and every ancestor in the store, each once, upstream
    first (so the first one that differs between two stores is the one to blame). Only
    manifests already on this machine count: with a URL root, one not cached here yet is
    left out rather than fetched (unlike the tree), which the registered model's card and
    registry entry have always been built from."""
    find = functools.partial(store.lookup, fetch=False)
    root = find(fp)
    if root is None:
        return []
    manifests: dict[str, dict] = {}
    tree = _expand(store, root, find, set(), manifests)
    return [manifests[n["fingerprint"]] for n in walk(tree, upstream_first=True) if _expanded(n)]


def walk(node: dict, upstream_first: bool = False) -> Iterator[dict]:
    """Every node of a lineage tree, stubs included: each before its upstream, or after
    them with `upstream_first` (the order in which a chain was built)."""
    if not upstream_first:
        yield node
    for u in node["upstream"]:
        yield from walk(u, upstream_first)
    if upstream_first:
        yield node


def audit(store: ArtifactStore, tree: dict) -> Iterator[tuple[dict, list[str]]]:
    """Each artifact of a lineage tree once, with the files whose bytes no longer match its
    manifest; a `missing` node comes with none (it has no bytes to check). One at a time,
    so a caller can report each before the next, possibly large, artifact is hashed."""
    seen = set()
    for node in walk(tree):
        if node.get("fingerprint", node["data_version"]) in seen:
            continue
        seen.add(node.get("fingerprint", node["data_version"]))
        if node.get("missing"):
            yield node, []
            continue
        yield node, store.verify(ArtifactRef(key=node["key"], fingerprint=node["fingerprint"],
                                             content_hash=node["data_version"], path=node["path"]))


def _expanded(node: dict) -> bool:
    return not node.get("shown_above") and not node.get("missing")


def _expand(store: ArtifactStore, ref: ArtifactRef, find: Callable[[str], ArtifactRef | None],
            seen: set[str], manifests: dict[str, dict]) -> dict:
    """The tree under `ref`; `find` decides which upstream manifests exist, and every
    manifest expanded is kept in `manifests` so the flat view reads each file once."""
    m = store.manifest(ref.fingerprint)
    if ref.fingerprint in seen:
        return {"key": m["key"], "data_version": m["content_hash"], "fingerprint": ref.fingerprint, "shown_above": True, "upstream": []}
    seen.add(ref.fingerprint)
    manifests[m["fingerprint"]] = m
    upstream = []
    for u in m["upstream"]:
        up = find(u["fingerprint"])
        upstream.append(_expand(store, up, find, seen, manifests) if up
                        else {"key": u["key"], "data_version": u["content_hash"], "missing": True, "upstream": []})
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
