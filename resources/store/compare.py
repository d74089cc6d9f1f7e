"""What `crucible compare` weighs between two registered models: each shared metric's
difference with a confidence interval (so a gap inside the noise is not read as a win),
and what differs in the configs and data of their chains (so a gap can be traced to a
cause). Registry entries in, plain values out; the command only prints them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from resources.store.artifact_store import ArtifactStore
from resources.store.lineage import ancestry


def metric_differences(a: dict, b: dict) -> Iterator[tuple[str, float, float, tuple[float, float] | None]]:
    """(metric, a's value, b's value, CI of b - a) for every metric both entries report,
    except the `start/` ones (each model's starting point before its training, not the model)."""
    for metric in sorted(k for k in set(a["metrics"]) & set(b["metrics"]) if not k.startswith("start/")):
        va, vb = a["metrics"][metric], b["metrics"][metric]
        yield metric, va, vb, difference_ci(vb - va, a.get("metric_cis", {}).get(metric), b.get("metric_cis", {}).get(metric))


def difference_ci(delta: float, ci_a: list | None, ci_b: list | None) -> tuple[float, float] | None:
    """CI of b - a for two independent evaluations (each model on its own test split), by a
    normal approximation from each model's 95% bootstrap CI."""
    if not ci_a or not ci_b:
        return None
    se = math.hypot((ci_a[1] - ci_a[0]) / (2 * 1.96), (ci_b[1] - ci_b[0]) / (2 * 1.96))
    return delta - 1.96 * se, delta + 1.96 * se


def config_changes(store: ArtifactStore, a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Every config field that differs between the chains of two registry entries."""
    return list(diff(chain_configs(store, a), chain_configs(store, b)))


def data_changes(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Every dataset whose data version differs between two registry entries."""
    return list(diff(a.get("data_hashes", {}), b.get("data_hashes", {})))


def chain_configs(store: ArtifactStore, entry: dict) -> dict:
    """Config of every artifact in a model's chain; its own recipe's stages are keyed by
    stage alone, so two recipes' models line up stage by stage."""
    own = entry["asset_key"].split("/")[0] + "/"
    return {m["key"].removeprefix(own): m["config"] for m in ancestry(store, entry["fingerprint"])}


def diff(a, b, path: str = ""):
    """(path, a, b) for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from diff(a.get(k), b.get(k), f"{path}.{k}")
    elif a != b:
        yield path, a, b
