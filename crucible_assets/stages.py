"""Asset factories for the stages of a recipe graph (`<recipe>/<stage>`). A recipe picks
its stages and config classes; the factories wire keys, inputs, caching and metadata."""


import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, AssetKey, Config, Output, asset
from pydantic import Field

from crucible_assets import evaluation, plots
from crucible_assets.caching import cached_artifact
from crucible_assets.data_parallel import launch_data_parallel
from crucible_assets.evaluation import EvalConfig
from crucible_assets.placement import TRAINING_STEP
from crucible_assets.supervised import SupervisedTrainConfig, read_pairs, train_supervised
from crucible_assets.tokenizing import tokenize_splits
from crucible_assets.training import read_metrics
from resources.artifact_store import ArtifactRef, ArtifactStore, fingerprint, hash_tree
from resources.backend import TrainingBackendResource
from resources.dataset_sources import DatasetConfig, load_records, split_records, validate_record
from resources.hf_io import check_safetensors, load_tokenizer
from resources.registry import ModelRegistry
from resources.tracking import TrackingResource

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


def base_model_asset(recipe: str, start_from: str | None = None, stage: str = "base_model",
                     base: str = "tiny_llama"):
    """`start_from` names the recipe whose registered model is the embedded default start;
    without it the chain starts from base/`base`. `stage` names the snapshot (a recipe with
    two models, like distillation's teacher and student, takes two). The default start is a
    dependency, not an input, so a run given another model (a local dir, a hub id) with that
    upstream left out of its selection never reads it."""
    start_key = key(start_from, "registered_model") if start_from else AssetKey(["base", base])

    @asset(key=key(recipe, stage), group_name=recipe, code_version="2", kinds={"huggingface"}, deps=[start_key],
           description=f"The model this recipe starts from (default: {start_key.to_user_string()}; or any local HF "
                       "model dir or hub id), copied into the artifact store so the lineage reaches its exact bytes.")
    def _base_model(context: AssetExecutionContext, config: BaseModelConfig, store: ArtifactStore,
                    registry: ModelRegistry) -> Output[ArtifactRef]:
        if config.base_model == EMBEDDED:
            start = store.latest(start_key.to_user_string())
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


def dataset_asset(recipe: str, config_cls: type[DatasetConfig], validate=validate_record):
    """`validate` normalizes each source record (conversations and documents by default)."""
    @asset(key=key(recipe, "dataset"), group_name=recipe, code_version="1", kinds={"json", "great_expectations"},
           description="The training records, read from the configured source (a generated task, a local JSONL/Parquet "
                       "file or a hub dataset), validated, split into train and held-out test. Great Expectations "
                       "checks block the rest of the recipe when the data are malformed.")
    def _dataset(context: AssetExecutionContext, config: config_cls, store: ArtifactStore) -> Output[ArtifactRef]:
        records = load_records(config, validate)  # raises on bad input before anything is written
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


def tokenized_asset(recipe: str, config_cls: type[TokenizeConfig], kind: str = "sft"):
    """`kind`: sft (tokens + weights per example) or pairs (chosen/rejected completions)."""
    @asset(key=key(recipe, "tokenized"), group_name=recipe, code_version="2", kinds={"parquet"},
           ins={"dataset": AssetIn(key=key(recipe, "dataset")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The dataset turned into training input: each example rendered with the model's chat template, "
                       "tokenized, and given a loss weight per token (1 on what the model should learn to say). "
                       "Parquet shards, one per split.")
    def _tokenized(context: AssetExecutionContext, config: config_cls, store: ArtifactStore,
                   dataset: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        if config.max_length < 2:
            raise ValueError(f"{context.asset_key.to_user_string()} config: max_length must be >= 2, got {config.max_length}")

        def build(out, _work):
            tok = load_tokenizer(base_model.dir)
            return tokenize_splits(dataset.dir, out, tok, kind, config.max_length, config.train_on_what, config.renderer)

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"dataset": dataset, "base_model": base_model}, build=build)

    return _tokenized


def read_examples(tokenized: ArtifactRef, split: str) -> list[dict]:
    return pq.read_table(tokenized.dir / f"{split}.parquet").to_pylist()


def save_checkpoint(client, out: Path, rows: list[dict], telemetry: dict, loss_key: str, eval_key: str) -> dict:
    """Sampler weights (HF dir), resumable state, per-step metrics, the loss curve and, when
    the rows carry them, reward and KL curves."""
    client.save_weights_for_sampler(out / "model")
    client.save_state(out / "state")
    (out / "metrics.jsonl").write_text(_jsonl(rows))
    plots.loss_curve(rows, out / "loss_curve.png", loss_key, eval_key)
    extra = plots.extra_curves(rows, out)
    final_eval = {k: v for k, v in [r for r in rows if eval_key in r][-1].items() if k.startswith("test/")}
    return {"steps": len(rows), loss_key: rows[-1][loss_key], **final_eval,
            "train_tokens": sum(r["num_tokens"] for r in rows), **telemetry, "plots": ["loss_curve.png", *extra]}


def write_report(out: Path, report: dict, metric: str, ylabel: str) -> dict:
    """report.json, report.md and a start-vs-trained bar plot of `metric` with its CIs."""
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (out / "report.md").write_text(evaluation.markdown(report))
    plots.comparison(["start", "trained"], [report[f"start/{metric}"], report[metric]],
                     [report[f"start/{metric}_ci"], report[f"{metric}_ci"]], ylabel, out / "comparison.png")
    return {k: v for k, v in report.items() if k != "samples"} | {"plots": ["comparison.png"]}


def tracked(context: AssetExecutionContext, store: ArtifactStore, tracking: TrackingResource, output: Output) -> Output:
    """Hands a checkpoint to the enabled tracking sinks (MLflow, TensorBoard), trained now or cached."""
    tracking.record_checkpoint(output.value, store.manifest(output.value.fingerprint), context.log.info)
    return output


def stop_of(tokenized: ArtifactRef) -> list[str]:
    return json.loads((tokenized.dir / "render.json").read_text())["stop"]


def sft_checkpoint_asset(recipe: str, config_cls: type[SupervisedTrainConfig]):
    @asset(key=key(recipe, "checkpoint"), group_name=recipe, code_version="2", kinds={"pytorch", "huggingface"}, **TRAINING_STEP,
           ins={"tokenized": AssetIn(key=key(recipe, "tokenized")), "base_model": AssetIn(key=key(recipe, "base_model"))},
           description="The fine-tuned model: supervised training (cross-entropy on the weighted target tokens) of the "
                       "starting model. Holds an HF model dir, the optimizer state to resume from, per-step "
                       "metrics.jsonl and the loss curve. nproc_per_node > 1 trains data-parallel under torchrun, "
                       "streamed back through Dagster Pipes.")
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                    tracking: TrackingResource, tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        config.check(context.asset_key.to_user_string())

        def build(out, work):
            if config.nproc_per_node > 1:
                return launch_data_parallel(context, backend, config, tokenized.dir, base_model.dir, out, work)
            client = backend.create_training_client(base_model.dir, config.lora_rank, config.seed)
            rows, telemetry = train_supervised(client, read_pairs(tokenized.dir, "train"), read_pairs(tokenized.dir, "test"),
                                               config, work, context.log.info)
            return save_checkpoint(client, out, rows, telemetry, "train_mean_nll", "test/nll")

        output = cached_artifact(context, store, config=config.model_dump(),
                                 upstream={"tokenized": tokenized, "base_model": base_model},
                                 build=build, backend=backend.identity())
        return tracked(context, store, tracking, output)

    return _checkpoint


def eval_report_asset(recipe: str, config_cls: type[EvalConfig], evaluate, metric: str, ylabel: str, description: str,
                      code_version: str = "1", curve: tuple[str, str] | None = None, extra_models: tuple[str, ...] = ()):
    """The trained checkpoint against the starting model on the held-out split.
    `evaluate(start, trained, test_rows, config, train_config, stop, **extra)` returns the report
    (train_config: the checkpoint's resolved training config; extra: a client for each of
    `extra_models`, the recipe's other model stages the checkpoint was trained with, e.g. a
    teacher); `metric` is plotted start vs. trained; `curve` = (train key, eval key) also
    plots the checkpoint's training curve."""
    @asset(key=key(recipe, "eval_report"), group_name=recipe, code_version=code_version, kinds={"json"},
           ins={"checkpoint": AssetIn(key=key(recipe, "checkpoint")), "tokenized": AssetIn(key=key(recipe, "tokenized")),
                "base_model": AssetIn(key=key(recipe, "base_model"))},
           description=description)
    def _eval_report(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                     checkpoint: ArtifactRef, tokenized: ArtifactRef, base_model: ArtifactRef) -> Output[ArtifactRef]:
        trained_with = store.manifest(checkpoint.fingerprint)
        upstream = {u["key"]: store.lookup(u["fingerprint"]) for u in trained_with["upstream"]}
        for name in extra_models:
            store.open_verified(upstream[f"{recipe}/{name}"])

        def build(out, _work):
            start = backend.create_training_client(base_model.dir, 0, config.seed)
            trained = backend.create_training_client(checkpoint.dir / "model", 0, config.seed)
            extra = {name: backend.create_training_client(upstream[f"{recipe}/{name}"].dir, 0, config.seed) for name in extra_models}
            report = evaluate(start, trained, read_examples(tokenized, "test"), config, trained_with["config"],
                              stop_of(tokenized), **extra)
            summary = write_report(out, report, metric, ylabel)
            if curve:
                plots.loss_curve(read_metrics(checkpoint.dir), out / "training_curve.png", *curve)
                summary["plots"].append("training_curve.png")
            return summary

        return cached_artifact(context, store, config=config.model_dump(),
                               upstream={"checkpoint": checkpoint, "tokenized": tokenized, "base_model": base_model},
                               build=build, backend=backend.identity())

    return _eval_report


def evaluate_sft(start, trained, rows: list[dict], config: EvalConfig, _train_config: dict, stop: list[str]) -> dict:
    target_bytes = np.array([r["target_bytes"] for r in rows], dtype=float)
    return evaluation.evaluate(start, trained, trained.tokenizer, rows, target_bytes, config, stop)


def sft_eval_report_asset(recipe: str, config_cls: type[EvalConfig]):
    return eval_report_asset(recipe, config_cls, evaluate_sft, "test/nll", "test/nll (nats/token)", code_version="2",
                             description="How much training helped, on held-out examples: NLL, bits per byte and answer "
                                         "accuracy of the trained model vs. the starting model, with bootstrap CIs.")


class RegisterConfig(Config):
    promotion_margin: float = Field(default=0.0, description="the new version becomes champion only if its gate metric beats "
                                                             "the champion's by more than this (in the metric's units)")


def model_card(recipe: str, lineage_edge: str, started_from: dict, report: dict, ancestry: list[dict]) -> str:
    """README.md of an export: what it came from (every ancestor's data version, the
    datasets' content hashes), how it was trained, what it scored. Only recorded inputs go
    in (no times, no run ids), so a reproduced chain writes the same bytes."""
    start = started_from.get("registered_model") or started_from["source"]
    trained = next(m for m in reversed(ancestry) if m["key"] == f"{recipe}/checkpoint")
    lines = [f"# {recipe}", "", f"Trained by Crucible's `{recipe}` recipe.", "", "## Lineage", "",
             f"`{lineage_edge}`: `{start}`", "", "| artifact | data version | code version |", "|---|---|---|"]
    lines += [f"| `{m['key']}` | `{m['content_hash']}` | {m['code_version']} |" for m in ancestry]
    lines += ["", "## Data", ""]
    lines += [f"- `{m['key']}`: content hash `{m['content_hash']}`, source `{m['config'].get('source')}`"
              f"{' ' + m['config']['path'] if m['config'].get('path') else ''}, {m['summary'].get('rows')} records"
              for m in ancestry if m["key"].endswith("/dataset")]
    lines += ["", "## How it was trained", "", f"Backend: `{json.dumps(trained.get('backend'), sort_keys=True)}`; "
              f"{trained['summary'].get('steps')} steps. Training config:", "", "```json",
              json.dumps(trained["config"], indent=1, sort_keys=True), "```", "",
              "Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(trained.get("packages", {}).items())), ""]
    lines += ["## Metrics (held-out, vs. the starting model, 95% bootstrap CIs)", "", evaluation.markdown(report), "## Intended use", "",
              "Research experiments; a tiny model trained on the recipe's data, not for production use.", ""]
    return "\n".join(lines)


def registered_model_asset(recipe: str, lineage_edge: str, metric: str = "test/nll", lower_is_better: bool = True,
                           lineage_stage: str = "base_model"):
    """`metric` (from the eval report) is what the promotion gate compares with the champion's;
    `lineage_edge` points at the model snapshot `lineage_stage` (the start, or a teacher)."""
    @asset(key=key(recipe, "registered_model"), group_name=recipe, code_version="3", kinds={"huggingface"},
           ins={"checkpoint": AssetIn(key=key(recipe, "checkpoint")), "eval_report": AssetIn(key=key(recipe, "eval_report"))},
           description="A registry version of the checkpoint (latest and staging): HF-format export with a model card. "
                       f"Its blocking check promotes it to champion if its {metric} beats the champion's by the margin.")
    def _registered_model(context: AssetExecutionContext, config: RegisterConfig, store: ArtifactStore, registry: ModelRegistry,
                          backend: TrainingBackendResource, tracking: TrackingResource, checkpoint: ArtifactRef,
                          eval_report: ArtifactRef) -> Output[ArtifactRef]:
        report = json.loads((eval_report.dir / "report.json").read_text())
        ckpt_manifest = store.manifest(checkpoint.fingerprint)
        upstream_versions = {u["key"]: u["content_hash"] for u in ckpt_manifest["upstream"]}
        edge_key = f"{recipe}/{lineage_stage}"
        edge_ref = next(u for u in ckpt_manifest["upstream"] if u["key"] == edge_key)
        edge_source = store.manifest(edge_ref["fingerprint"])["summary"]
        ancestry = store.ancestry(eval_report.fingerprint)

        def build(out, _work):
            exported = backend.export_model(checkpoint.dir / "model", out)
            (out / "README.md").write_text(model_card(recipe, lineage_edge, edge_source, report, ancestry))
            return {metric: report[metric], "model": recipe, **exported}

        output = cached_artifact(context, store, config={"model": recipe, "metric": metric},
                                 upstream={"checkpoint": checkpoint, "eval_report": eval_report}, build=build)
        ref = output.value
        entry = registry.register(recipe, {
            "fingerprint": ref.fingerprint, "content_hash": ref.content_hash, "asset_key": ref.key, "path": ref.path,
            "metrics": {k: v for k, v in report.items() if isinstance(v, (int, float))},
            "metric_cis": {k.removesuffix("_ci"): v for k, v in report.items() if k.endswith("_ci")},
            "lineage": {lineage_edge: {"data_version": upstream_versions[edge_key], "source": edge_source["source"],
                                       "model": edge_source.get("registered_model")},
                        "datasets": {k: v for k, v in upstream_versions.items() if k != edge_key}},
            "data_hashes": {m["key"]: m["content_hash"] for m in ancestry if m["key"].endswith("/dataset")},
            "config_hash": fingerprint(configs={m["key"]: m["config"] for m in ancestry}),
            "run_id": context.run_id,
        }, gate={"metric": metric, "lower_is_better": lower_is_better, "margin": config.promotion_margin})
        tracking.link_registration(checkpoint, entry, recipe)
        return Output(ref, data_version=output.data_version, metadata={**output.metadata, "registry_version": entry["version"]})

    return _registered_model
