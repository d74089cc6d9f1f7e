"""The one pattern every asset follows: fingerprint the inputs, reuse the stored artifact on
a hit, otherwise build it in staging and publish it; report the content hash as the
Dagster data version either way. `build(out_dir, work_dir)` writes the artifact into
out_dir; work_dir survives a crash for resumable work and is removed on publish."""

from __future__ import annotations

import functools
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from dagster import AssetExecutionContext, AssetKey, DataVersion, Output

from crucible_assets.ui_metadata import to_metadata
from resources.store.artifact_store import ArtifactRef, ArtifactStore, fingerprint

def key(group: str, stage: str) -> AssetKey:
    """`<recipe>/<stage>` (or `base/...`, `feedback/...`): every asset key is a group and a stage."""
    return AssetKey([group, stage])


PACKAGES = ("torch", "transformers", "peft", "tokenizers", "dagster", "datasets")


@functools.cache  # each lookup scans every installed distribution: once per process, not per asset
def package_versions() -> dict[str, str]:
    return {p: version(p) for p in PACKAGES}


def cached_artifact(
    context: AssetExecutionContext,
    store: ArtifactStore,
    *,
    config: dict,
    upstream: dict[str, ArtifactRef],
    build: Callable[[Path, Path], dict | None],
    backend: dict | None = None,
    extra_inputs: dict | None = None,
    same_as: str | None = None,
) -> Output:
    """`same_as`: the asset whose artifacts these are under another name (a sweep point's
    checkpoint is its recipe's checkpoint at the point's config), fingerprinted as that asset
    so either one's build is the other's cache hit."""
    name = context.asset_key.to_user_string()
    # a partition (a sweep point) is its own store key, so each point has its own latest ref;
    # the fingerprint leaves the partition out, so two sweeps' points with equal inputs are one artifact
    # (a partitioned run's unpartitioned assets see its partition key too: they are not partitioned)
    stored_as = f"{name}/{context.partition_key}" if context.assets_def.partitions_def else name
    # the asset's declared code_version, so bumping it in the decorator invalidates the cache
    code_version = context.assets_def.code_versions_by_key[context.asset_key]
    fp = fingerprint(
        asset_key=same_as or name,  # two assets with equal inputs (e.g. two recipes' base_model) stay distinct
        code_version=code_version,
        config=config,
        upstream={k: r.content_hash for k, r in sorted(upstream.items())},
        backend=backend,
        extra=extra_inputs,
    )
    record = {
        "code_version": code_version,
        "config": config,
        "upstream": [r.model_dump(exclude={"path"}) for r in upstream.values()],
        "backend": backend,
        "extra_inputs": extra_inputs,
        "run_id": context.run_id,
        "created_at": time.time(),
        "packages": package_versions(),
    }
    ref, built = store.build_once(stored_as, fp, build, record, context.log.info)
    ref = ref.model_copy(update={"key": stored_as})  # a hit may have been published under another point's name
    cached = not built
    if cached:
        context.log.info(f"cache hit for {stored_as}: fingerprint {fp}, data version {ref.content_hash}")
        store.open_verified(ref)  # a hit hands these bytes downstream; never corrupt ones
    manifest = store.manifest(fp)
    return Output(ref, data_version=DataVersion(ref.content_hash),
                  metadata=to_metadata(ref, manifest["summary"], cached, manifest["code_version"]))
