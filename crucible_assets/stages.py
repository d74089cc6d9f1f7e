"""Asset factories for the stages of a recipe graph (`<recipe>/<stage>`). A recipe picks
its stages and config classes; the factories wire keys, inputs, caching and metadata."""


import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, AssetKey, Config, Output, asset
from pydantic import Field

from crucible_assets import evaluation, plots
from crucible_assets.caching import cached_artifact
from crucible_assets.evaluation import EvalConfig
from crucible_assets.rendering import RenderError, prompt_and_reference, render, stop_sequences
from crucible_assets.supervised import SupervisedConfig, train_supervised
from resources.artifact_store import ArtifactRef, ArtifactStore, hash_tree
from resources.dataset_sources import DatasetConfig, load_records, split_records
from resources.hf_io import load_tokenizer
from resources.local_torch import LocalTorchBackend
from resources.registry import ModelRegistry

EMBEDDED = "embedded"


class BaseModelConfig(Config):
    base_model: str = Field(default=EMBEDDED, description="'embedded' (the recipe's default start: base/tiny_llama or the "
                                                          "registered model of the recipe it builds on), a local HF model dir, or an HF hub id")
    revision: str = Field(default="", description="hub models: revision to pin")


class TokenizeConfig(Config):
    max_length: int = Field(default=512, description="tokens per sequence; longer ones are truncated")
    train_on_what: str = Field(default="all_assistant_messages", description="last_assistant_message | all_assistant_messages | all_messages")
    renderer: str = Field(default="chat_template", description="chat_template (the model's own) | role_colon (models without one)")


def key(recipe: str, stage: str) -> AssetKey:
    return AssetKey([recipe, stage])


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def base_model_asset(recipe: str, start_from: str | None = None):
    """`start_from` names the recipe whose registered model is the embedded default start;
    without it the chain starts from base/tiny_llama."""
    start_key = key(start_from, "registered_model") if start_from else AssetKey(["base", "tiny_llama"])

    @asset(key=key(recipe, "base_model"), group_name=recipe, code_version="2", kinds={"huggingface"},
           ins={"start": AssetIn(key=start_key)},
           description=f"The starting model (default: {start_key.to_user_string()}), snapshotted into the store so lineage reaches its bytes.")
    def _base_model(context: AssetExecutionContext, config: BaseModelConfig, store: ArtifactStore, registry: ModelRegistry,
                    start: ArtifactRef) -> Output[ArtifactRef]:
        if config.base_model == EMBEDDED:
            source = start.dir
        elif Path(config.base_model).is_dir():
            source = Path(config.base_model)
        else:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(config.base_model, revision=config.revision or None,
                                            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
        source_hash, _ = hash_tree(source)
        origin = {"source": config.base_model}
        if config.base_model == EMBEDDED:
            origin["source"] = start.key
            entry = registry.find(start_from, start.fingerprint) if start_from else None
            if entry:
                origin["registered_model"] = f"{start_from}:{entry['version']}"

        def build(out, _work):
            shutil.rmtree(out)
            shutil.copytree(source, out)
            return origin

        upstream = {"start": start} if config.base_model == EMBEDDED else {}
        return cached_artifact(context, store, config=config.model_dump(), upstream=upstream,
                               build=build, extra_inputs={"source_hash": source_hash})

    return _base_model


def dataset_asset(recipe: str, config_cls: type[DatasetConfig]):
    @asset(key=key(recipe, "dataset"), group_name=recipe, code_version="1", kinds={"json"},
           description="Raw records from the configured source, validated, with a seeded held-out split.")
    def _dataset(context: AssetExecutionContext, config: config_cls, store: ArtifactStore) -> Output[ArtifactRef]:
        records = load_records(config)  # raises on bad input before anything is written
        train, test = split_records(records, config.test_fraction, config.seed)
        body = {"train": _jsonl(train), "test": _jsonl(test)}

        def build(out, _work):
            for split, text in body.items():
                (out / f"{split}.jsonl").write_text(text)
            return {"rows": len(records), "train_rows": len(train), "test_rows": len(test)}

        records_hash = hashlib.sha256((body["train"] + body["test"]).encode()).hexdigest()
        return cached_artifact(context, store, config=config.model_dump(), upstream={},
                               build=build, extra_inputs={"records_hash": records_hash})

    return _dataset


def tokenized_asset(recipe: str, config_cls: type[TokenizeConfig]):
    @asset(key=key(recipe, "tokenized"), group_name=recipe, code_version="2", kinds={"parquet"},
           ins={"dataset": AssetIn(key=key(recipe, "dataset")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="Parquet shards of token ids and loss weights, rendered with the model's chat template.")
    def _tokenized(context: AssetExecutionContext, config: config_cls, store: ArtifactStore,
                   dataset: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        if config.max_length < 2:
            raise ValueError(f"tokenize config: max_length must be >= 2, got {config.max_length}")

        def build(out, _work):
            tok = load_tokenizer(base_model.dir)
            summary = {}
            for split in ("train", "test"):
                path = dataset.dir / f"{split}.jsonl"
                rows, truncated = [], 0
                for i, record in enumerate(_read_jsonl(path), 1):
                    where = lambda: f"{path}: record {i} ({json.dumps(record)[:300]}): field 'messages'"  # noqa: E731
                    try:
                        tokens, weights = render(tok, record, config.train_on_what, config.renderer)
                    except RenderError as e:
                        raise RenderError(f"{where()}: {e}") from None
                    truncated += len(tokens) > config.max_length
                    tokens, weights = tokens[: config.max_length], weights[: config.max_length]
                    if sum(weights[1:]) == 0:
                        raise RenderError(f"{where()}: loss weights sum to zero within max_length {config.max_length}")
                    prompt, reference = prompt_and_reference(tok, record, config.renderer)
                    target_text = tok.decode([t for t, w in zip(tokens[1:], weights[1:]) if w > 0])
                    rows.append({"tokens": tokens, "weights": weights, "prompt_tokens": prompt,
                                 "reference": reference, "target_bytes": len(target_text.encode())})
                schema = pa.schema([("tokens", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())),
                                    ("prompt_tokens", pa.list_(pa.int32())), ("reference", pa.string()),
                                    ("target_bytes", pa.int64())])
                pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"{split}.parquet")
                summary[f"{split}_rows"] = len(rows)
                summary[f"{split}_tokens"] = sum(len(r["tokens"]) for r in rows)
                summary[f"{split}_loss_tokens"] = int(sum(sum(r["weights"][1:]) for r in rows))
                summary[f"{split}_truncated"] = truncated
                lengths = np.array([len(r["tokens"]) for r in rows])
                summary[f"{split}_length_percentiles"] = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)}
            render_info = {"renderer": config.renderer, "train_on_what": config.train_on_what, "stop": stop_sequences(tok, config.renderer)}
            (out / "render.json").write_text(json.dumps(render_info, sort_keys=True))
            return summary | {"stop": render_info["stop"]}

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"dataset": dataset, "base_model": base_model}, build=build)

    return _tokenized


def read_examples(tokenized: ArtifactRef, split: str) -> list[dict]:
    return pq.read_table(tokenized.dir / f"{split}.parquet").to_pylist()


def sft_checkpoint_asset(recipe: str, config_cls: type[SupervisedConfig]):
    @asset(key=key(recipe, "checkpoint"), group_name=recipe, code_version="2", kinds={"pytorch", "huggingface"},
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="Supervised fine-tune (cross-entropy on weighted target tokens): HF model dir, "
                       "resumable optimizer state, per-step metrics.jsonl and a loss curve.")
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: LocalTorchBackend,
                    tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        config.check()

        def build(out, work):
            pairs = lambda split: [(r["tokens"], r["weights"]) for r in read_examples(tokenized, split)]  # noqa: E731
            client = backend.create_training_client(base_model.dir, config.lora_rank, config.seed)
            rows, telemetry = train_supervised(client, pairs("train"), pairs("test"), config, work, context.log.info)
            client.save_weights_for_sampler(out / "model")
            client.save_state(out / "state")
            (out / "metrics.jsonl").write_text(_jsonl(rows))
            plots.loss_curve(rows, out / "loss_curve.png")
            final_eval = [r for r in rows if "test/nll" in r][-1]
            return {"steps": len(rows), "train_mean_nll": rows[-1]["train_mean_nll"], "test/nll": final_eval["test/nll"],
                    "train_tokens": sum(r["num_tokens"] for r in rows), **telemetry, "plots": ["loss_curve.png"]}

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"tokenized": tokenized, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _checkpoint


def eval_report_asset(recipe: str, config_cls: type[EvalConfig]):
    @asset(key=key(recipe, "eval_report"), group_name=recipe, code_version="2", kinds={"json"},
           ins={"checkpoint": AssetIn(key=key(recipe, "checkpoint")), "tokenized": AssetIn(key=key(recipe, "tokenized")),
                "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="Held-out NLL, bits per byte and answer accuracy vs. the starting model, with bootstrap CIs.")
    def _eval_report(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: LocalTorchBackend,
                     checkpoint: ArtifactRef, tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        def build(out, _work):
            rows = read_examples(tokenized, "test")
            start = backend.create_training_client(base_model.dir, 0, config.seed)
            trained = backend.create_training_client(checkpoint.dir / "model", 0, config.seed)
            target_bytes = np.array([r["target_bytes"] for r in rows], dtype=float)
            stop = json.loads((tokenized.dir / "render.json").read_text())["stop"]
            report = evaluation.evaluate(start, trained, trained.tokenizer, rows, target_bytes, config, stop)
            (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
            (out / "report.md").write_text(evaluation.markdown(report))
            plots.comparison(["start", "trained"], [report["start/test/nll"], report["test/nll"]],
                             [report["start/test/nll_ci"], report["test/nll_ci"]], "test/nll (nats/token)", out / "nll.png")
            return {k: v for k, v in report.items() if k != "samples"} | {"plots": ["nll.png"]}

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"checkpoint": checkpoint, "tokenized": tokenized, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _eval_report


def model_card(recipe: str, lineage_edge: str, started_from: dict, report: dict, upstream: dict[str, str]) -> str:
    start = started_from.get("registered_model") or started_from["source"]
    lines = [f"# {recipe}", "", f"Trained by Crucible's `{recipe}` recipe.", "", "## Lineage", "",
             f"`{lineage_edge}`: `{start}`", ""]
    lines += [f"- `{k}`: data version `{v}`" for k, v in upstream.items()]
    lines += ["", "## Metrics (held-out, vs. the starting model)", "", evaluation.markdown(report), "## Intended use", "",
              "Research experiments; a tiny model trained on the recipe's data, not for production use.", ""]
    return "\n".join(lines)


def registered_model_asset(recipe: str, lineage_edge: str, metric: str = "test/nll"):
    @asset(key=key(recipe, "registered_model"), group_name=recipe, code_version="2", kinds={"huggingface"},
           ins={"checkpoint": AssetIn(key=key(recipe, "checkpoint")), "eval_report": AssetIn(key=key(recipe, "eval_report"))},
           description="A registry version of the checkpoint: HF-format export with a model card; "
                       "gated by the eval report's blocking check.")
    def _registered_model(context: AssetExecutionContext, store: ArtifactStore, registry: ModelRegistry,
                          checkpoint: ArtifactRef, eval_report: ArtifactRef) -> Output[ArtifactRef]:
        report = json.loads((eval_report.dir / "report.json").read_text())
        ckpt_manifest = store.manifest(checkpoint.fingerprint)
        upstream_versions = {u["key"]: u["content_hash"] for u in ckpt_manifest["upstream"]}
        base_key = f"{recipe}/base_model"
        base_ref = next(u for u in ckpt_manifest["upstream"] if u["key"] == base_key)
        started_from = store.manifest(base_ref["fingerprint"])["summary"]

        def build(out, _work):
            shutil.copytree(checkpoint.dir / "model", out, dirs_exist_ok=True)
            (out / "README.md").write_text(model_card(recipe, lineage_edge, started_from, report, upstream_versions))
            return {"test/nll": report["test/nll"], "model": recipe}

        output = cached_artifact(context, store, config={"model": recipe, "metric": metric},
                                 upstream={"checkpoint": checkpoint, "eval_report": eval_report}, build=build)
        ref = output.value
        entry = registry.register(recipe, {
            "fingerprint": ref.fingerprint, "content_hash": ref.content_hash, "asset_key": ref.key, "path": ref.path,
            "metrics": {k: v for k, v in report.items() if isinstance(v, (int, float))},
            "lineage": {lineage_edge: {"data_version": upstream_versions[base_key], "source": started_from["source"],
                                       "model": started_from.get("registered_model")},
                        "datasets": {k: v for k, v in upstream_versions.items() if k != base_key}},
            "run_id": context.run_id,
        }, metric=metric)
        return Output(ref, data_version=output.data_version, metadata={**output.metadata, "registry_version": entry["version"]})

    return _registered_model
