"""A recipe's data stages: `<recipe>/dataset` (records from the configured source, validated
and split) and `<recipe>/tokenized` (Parquet shards of token ids and loss weights). What a
record is follows from the recipe's data kind, one word for validation, checks and schema."""

import hashlib
import json
from typing import Annotated, Literal

from dagster import AssetExecutionContext, AssetIn, Config, Output, asset
from pydantic import Field

from crucible_assets.caching import cached_artifact, key
from crucible_assets.rendering import RendererName, TrainOn
from crucible_assets.tokenizing import SOURCES, OverlongPolicy, tokenize_splits
from resources.datasets.pairs import validate_pair
from resources.datasets.problems import validate_problem
from resources.datasets.sources import DatasetConfig, load_records, validate_record
from resources.datasets.splits import once_each, record_identity, split_records
from resources.hf_io import load_tokenizer
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.jsonl import to_jsonl

# What a recipe's dataset holds, one word everywhere (validation, checks, tokenized schema):
# conversations (chats or plain documents), pairs (chosen/rejected chats), problems (question + answer).
DataKind = Literal["conversations", "pairs", "problems"]
VALIDATORS = {"conversations": validate_record, "pairs": validate_pair, "problems": validate_problem}


MaxLength = Annotated[int, Field(ge=2)]  # a sequence the model can learn from: one input, one target


class TokenizeConfig(Config):
    max_length: MaxLength = Field(default=512, description="tokens per sequence; longer ones are truncated")
    train_on_what: TrainOn = "all_assistant_messages"
    renderer: RendererName = Field(default="chat_template", description="chat_template (the model's own) | role_colon (models without one)")
    overlong: OverlongPolicy = Field(default="drop", description="a record with nothing left to learn within max_length (or a prompt "
                                                                 "longer than it): drop it and count it, or fail the run")


def dataset_asset(recipe: str, config_cls: type[DatasetConfig], kind: DataKind):
    @asset(key=key(recipe, "dataset"), group_name=recipe, code_version="4", kinds={"json", "great_expectations"},
           description="The training records, read from the configured source (a generated task, a local JSONL/Parquet "
                       "file or a hub dataset), validated, split into train and held-out test by item (a held-out prompt or "
                       "question is never trained on, and is tested once), plus test_ood where the config names an "
                       "out-of-distribution generator. Great Expectations checks block the rest of the recipe when the "
                       "data are malformed or held-out items leak into train.")
    def _dataset(context: AssetExecutionContext, config: config_cls, store: ArtifactStore) -> Output[ArtifactRef]:
        notes: list[str] = []  # what the loader did that the user did not spell out (a cap, dropped records)
        sources: list[str] = []  # the user's file and line of each record, so later errors can name them
        records = load_records(config, VALIDATORS[kind], notes, sources)  # raises on bad input before anything is written
        for note in notes:
            context.log.info(note)
        def identity(record_and_source: tuple[dict, str]) -> str:
            return record_identity(record_and_source[0])

        train, test = split_records(list(zip(records, sources)), config.test_fraction, config.seed, identity)
        splits = {"train": train, "test": test} | ({"test_ood": once_each(ood_records(config), identity)}
                                                   if config.ood_generator else {})
        items = {"train_items": len({record_identity(r) for r, _ in train}), "test_items": len(test),
                 "test_repeats_dropped": len(records) - len(train) - len(test),
                 **({"test_ood_items": len(splits["test_ood"])} if "test_ood" in splits else {})}
        context.log.info(f"held out {items['test_items']} of {items['train_items'] + items['test_items']} distinct items "
                         f"(test_fraction {config.test_fraction}); {items['test_repeats_dropped']} repeats of held-out items "
                         "dropped, so each is tested once and none is trained on")
        body = {split: to_jsonl([r for r, _ in rs]) for split, rs in splits.items()}
        provenance = {split: [s for _, s in rs] for split, rs in splits.items()}

        def build(out, _work):
            for split, text in body.items():
                (out / f"{split}.jsonl").write_text(text)
            (out / SOURCES).write_text(json.dumps(provenance, indent=0))
            return {"rows": len(records), "train_rows": len(train), "test_rows": len(test), **items,
                    **({"notes": notes} if notes else {})}

        records_hash = hashlib.sha256("".join(body.values()).encode()).hexdigest()
        # where the records came from is part of the bytes (sources.json), so of the fingerprint too
        sources_hash = hashlib.sha256(json.dumps(provenance).encode()).hexdigest()
        return cached_artifact(context, store, config=config.model_dump(), upstream={}, build=build,
                               extra_inputs={"records_hash": records_hash, "sources_hash": sources_hash})

    return _dataset


def ood_records(config: DatasetConfig) -> list[tuple[dict, str]]:
    """The out-of-distribution items (config.ood_generator) with where each came from: apart
    from the training data, so only the held-out side has them."""
    sources: list[str] = []
    ood = config.model_copy(update={"source": "synthetic", "generator": config.ood_generator, "num_examples": config.ood_examples})
    return list(zip(load_records(ood, sources=sources), sources))


def tokenized_asset(recipe: str, config_cls: type[TokenizeConfig], kind: DataKind):
    @asset(key=key(recipe, "tokenized"), group_name=recipe, code_version="2", kinds={"parquet"},
           ins={"dataset": AssetIn(key=key(recipe, "dataset")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The dataset turned into training input: each example rendered with the model's chat template, "
                       "tokenized, and given a loss weight per token (1 on what the model should learn to say). "
                       "Parquet shards, one per split.")
    def _tokenized(context: AssetExecutionContext, config: config_cls, store: ArtifactStore,
                   dataset: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            tok = load_tokenizer(base_model.dir)
            summary = tokenize_splits(dataset.dir, out, tok, kind, config.max_length, config.train_on_what, config.renderer,
                                      config.overlong)
            if dropped := summary["train_dropped_overlong"] + summary["test_dropped_overlong"]:
                context.log.warning(f"dropped {dropped} records longer than max_length {config.max_length} with nothing left "
                                    "to learn (overlong: drop); counted as train/test_dropped_overlong in the metadata")
            return summary

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"dataset": dataset, "base_model": base_model}, build=build)

    return _tokenized
