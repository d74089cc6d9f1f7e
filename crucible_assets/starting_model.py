"""`<recipe>/base_model` (and any other model snapshot a recipe reads, like distillation's
teacher): the model a recipe starts from, copied into the artifact store so the lineage
reaches its exact bytes. By default another recipe's registered model or a `base/` model;
a run may name any local HF dir or hub id instead."""

import shutil
from pathlib import Path

from dagster import AssetExecutionContext, AssetKey, Config, Output, asset
from pydantic import Field

from crucible_assets.caching import cached_artifact, key
from resources.hf_io import check_safetensors
from resources.store.artifact_store import ArtifactRef, ArtifactStore, hash_tree
from resources.store.registry import ModelRegistry

EMBEDDED = "embedded"


class BaseModelConfig(Config):
    base_model: str = Field(default=EMBEDDED, description="'embedded' (the recipe's default start: base/tiny_llama or the "
                                                          "registered model of the recipe it builds on), a local HF model dir, or an HF hub id")
    revision: str = Field(default="", description="hub models: revision to pin")
    registered: str = Field(default="champion", description="embedded start from another recipe: which of its registered "
                                                            "versions, an alias (champion, latest, staging) or a version number")


def registered_start(registry: ModelRegistry, store: ArtifactStore, recipe: str, which: str) -> tuple[dict, ArtifactRef]:
    """The registry entry a chain starts from, and its artifact: by default the champion, so a
    version that did not beat it (registered, but not promoted) is not what the next recipe
    builds on."""
    spec = f"{recipe}:{which}" if which.isdigit() else f"{recipe}@{which}"
    try:
        entry = registry.resolve(spec)
    except KeyError as e:
        raise ValueError(f"cannot start from {spec}: {e.args[0]}; run the {recipe} job first, or set registered: "
                         "latest (or a version number) in this op's config") from None
    if (ref := store.lookup(entry["fingerprint"])) is None:
        raise FileNotFoundError(f"{spec} (fingerprint {entry['fingerprint']}) is in the registry but not in the store")
    return entry, ref


def starting_model_asset(recipe: str, start_from: str | None = None, stage: str = "base_model", base: str = "tiny_llama"):
    """`start_from` names the recipe whose registered model is the embedded default start;
    without it the chain starts from base/`base`. `stage` names the snapshot. The default
    start is a dependency, not an input, so a run given another model (a local dir, a hub
    id) with that upstream left out of its selection never reads it."""
    start_key = key(start_from, "registered_model") if start_from else AssetKey(["base", base])

    @asset(key=key(recipe, stage), group_name=recipe, code_version="2", kinds={"huggingface"}, deps=[start_key],
           description=f"The model this recipe starts from (default: {start_key.to_user_string()}; or any local HF "
                       "model dir or hub id), copied into the artifact store so the lineage reaches its exact bytes.")
    def _starting_model(context: AssetExecutionContext, config: BaseModelConfig, store: ArtifactStore,
                        registry: ModelRegistry) -> Output[ArtifactRef]:
        if config.base_model == EMBEDDED:
            entry, start = (registered_start(registry, store, start_from, config.registered) if start_from
                            else (None, store.latest(start_key.to_user_string())))
            source = store.open_verified(start)
            source_hash = start.content_hash  # verified just now: hash_tree(source) would give the same
        else:
            if Path(config.base_model).is_dir():
                source = Path(config.base_model)
                check_safetensors(source)  # refuse a pickle checkpoint before it is snapshotted
            else:
                from huggingface_hub import snapshot_download

                source = Path(snapshot_download(config.base_model, revision=config.revision or None,
                                                allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
            source_hash, _ = hash_tree(source)
        origin = {"source": config.base_model}
        if config.base_model == EMBEDDED:
            origin["source"] = start.key
            if entry:  # which version, and how it was chosen (an alias moves; the version does not)
                origin |= {"registered_model": f"{start_from}:{entry['version']}", "registered_as": config.registered}

        def build(out, _work):
            shutil.rmtree(out)
            shutil.copytree(source, out)
            return origin

        upstream = {"start": start} if config.base_model == EMBEDDED else {}
        return cached_artifact(context, store, config=config.model_dump(), upstream=upstream,
                               build=build, extra_inputs={"source_hash": source_hash})

    return _starting_model
