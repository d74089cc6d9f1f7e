"""`<recipe>/eval_report`: the trained checkpoint against the starting model on the held-out
split, by the algorithm's `evaluate`; report.json, report.md and a start-vs-trained plot of
the algorithm's headline metric with its CIs (plus the training curve where it says so)."""

import json
import math
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, Output, PartitionsDefinition, asset

from crucible_assets import evaluation, plots
from crucible_assets.caching import cached_artifact, key
from crucible_assets.evaluation import EvalConfig
from crucible_assets.tokenizing import read_ood_rows, read_rows, read_stop
from crucible_assets.train.algorithm import Algorithm, EvalRun
from resources.backends.resource import TrainingBackendResource
from resources.backends.types import TrainingClient
from resources.store.artifact_store import ArtifactRef, ArtifactStore, fingerprint
from resources.store.jsonl import read_jsonl


def write_report(out: Path, report: dict, metric: str, ylabel: str) -> dict:
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (out / "report.md").write_text(evaluation.markdown(report))
    plots.comparison(["start", "trained"], [report[f"start/{metric}"], report[metric]],
                     [report[f"start/{metric}_ci"], report[f"{metric}_ci"]], ylabel, out / "comparison.png")
    return {k: v for k, v in report.items() if k != "samples"} | {"plots": ["comparison.png"]}


def worse_than_uniform(report: dict, vocab_size: int, recipe: str) -> str | None:
    """A start model that predicts the held-out text worse than a uniform guess was never
    trained on text like it (the embedded base/tiny_llama knows only the default arithmetic
    tasks); a user should hear that before reading anything into the gain."""
    start_nll, uniform = report.get("start/test/nll"), math.log(vocab_size)
    if start_nll is None or start_nll <= uniform:
        return None
    return (f"the starting model's held-out NLL ({start_nll:.3g} nats/token) is worse than a uniform guess over its "
            f"{vocab_size}-token vocabulary ({uniform:.3g}): it has not seen text like this data. The embedded "
            f"base/tiny_llama is a smoke-test model for the default tasks; start from a real one with "
            f"ops: {{{recipe}__base_model: {{config: {{base_model: <hub id or local HF dir>}}}}}} (docs/own_data.md)")


def eval_set(held_out: str, eval_config: dict, code_version: str) -> dict:
    """What a metric was measured on: the held-out shard's bytes, the eval config and the eval
    code. Two models' values compare only when their `id`s are equal (registry promotion)."""
    parts = {"held_out": held_out, "eval_config": eval_config, "eval_code_version": code_version}
    return {"id": fingerprint(**parts), **parts}


def evaluate_model(recipe: str, algorithm: Algorithm, store: ArtifactStore, backend: TrainingBackendResource,
                   config: EvalConfig, model_dir: Path, inputs: dict[str, ArtifactRef]) -> tuple[dict, TrainingClient]:
    """The algorithm's `evaluate` of the model in `model_dir` against the starting model, on an
    eval report's `inputs` (by stage: checkpoint, tokenized, base_model, the held-out stage):
    the checkpoint's train config and other model stages (a teacher), the held-out rows, and
    the eval set they make. The eval report runs it on its checkpoint; champion_eval runs it
    on the champion with the candidate report's inputs, so both measure on one eval set."""
    trained_with = store.manifest(inputs["checkpoint"].fingerprint)
    upstream = {u["key"]: store.lookup(u["fingerprint"]) for u in trained_with["upstream"]}
    held_out = inputs[algorithm.held_out]
    start = backend.create_training_client(inputs["base_model"].dir, 0, config.seed)
    trained = backend.create_training_client(model_dir, 0, config.seed)
    models = {name: backend.create_training_client(store.open_verified(upstream[f"{recipe}/{name}"]), 0, config.seed)
              for name in algorithm.eval_models}
    report = algorithm.evaluate(EvalRun(start, trained, read_rows(held_out, "test"), config,
                                        algorithm.train_config(**trained_with["config"]), read_stop(inputs["tokenized"]), models,
                                        read_ood_rows(held_out)))
    report["eval_set"] = eval_set(store.manifest(held_out.fingerprint)["files"]["test.parquet"], config.model_dump(),
                                  algorithm.eval_version)
    return report, trained


def eval_report_asset(recipe: str, algorithm: Algorithm, config_cls: type[EvalConfig], stage: str = "eval_report",
                      checkpoint: str = "checkpoint", partitions_def: PartitionsDefinition | None = None,
                      description: str | None = None):
    """`stage`, `checkpoint` and `partitions_def`: a sweep's `<recipe>/sweep_eval` of its
    `sweep_checkpoint`, one partition per point."""
    stages = dict.fromkeys(("checkpoint", "tokenized", algorithm.held_out, "base_model"))  # the manifest's upstream order
    stage_keys = {s: key(recipe, checkpoint if s == "checkpoint" else s) for s in stages}

    @asset(key=key(recipe, stage), group_name=recipe, code_version=algorithm.eval_version, kinds={"json"},
           ins={s: AssetIn(key=k) for s, k in stage_keys.items()}, partitions_def=partitions_def,
           description=description or algorithm.eval_description)
    def _eval_report(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                     **inputs: ArtifactRef) -> Output[ArtifactRef]:
        checkpoint = inputs["checkpoint"]

        def build(out, _work):
            report, trained = evaluate_model(recipe, algorithm, store, backend, config, checkpoint.dir / "model", inputs)
            summary = write_report(out, report, *algorithm.report_metric)
            if warning := worse_than_uniform(report, len(trained.tokenizer), recipe):
                context.log.warning(warning)
                summary["start_model_warning"] = warning
            if algorithm.plot_training_curve:
                plots.loss_curve(read_jsonl(checkpoint.dir / "metrics.jsonl"), out / "training_curve.png",
                                 algorithm.loss_key, algorithm.eval_key)
                summary["plots"].append("training_curve.png")
            return summary

        return cached_artifact(context, store, config=config.model_dump(), upstream={s: inputs[s] for s in stages},
                               build=build, backend=backend.identity(), same_as=f"{recipe}/eval_report")

    return _eval_report
