"""`<recipe>/checkpoint`, the one factory for every algorithm: check the config, make the
training client from the starting model, run the algorithm's `train`, save sampler weights,
resumable state, metrics and curves, cache by fingerprint, hand the result to the tracking
sinks. With `nproc_per_node > 1` (algorithms that allow it) the same `train` runs in
torchrun's processes instead (train/torchrun.py)."""

from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, DagsterEventType, Output, PartitionsDefinition, asset

from crucible_assets import plots
from crucible_assets.caching import cached_artifact, key
from crucible_assets.train.algorithm import Algorithm, TrainingRun
from crucible_assets.train.loop import TrainConfig, total_steps
from crucible_assets.train.placement import TRAINING_STEP
from crucible_assets.train.torchrun import launch_torchrun
from resources.backends.resource import TrainingBackendResource
from resources.store.artifact_store import ArtifactRef, ArtifactStore
from resources.store.jsonl import to_jsonl
from resources.tracking import TrackingResource


MANY_EPOCHS = 20  # past this many passes over the data a run is more likely a typo in max_steps than a plan


def refuse_after_failures(context: AssetExecutionContext) -> None:
    """Fail fast: every dataset and its checks run before any training (they are roots of the
    graph), so when one of them failed, training another recipe's chain first would only
    delay the same failed run by minutes. Everything finished so far is cached for the re-run."""
    failed = sorted({e.step_key for e in context.instance.all_logs(context.run_id, of_type=DagsterEventType.STEP_FAILURE)})
    if failed:
        raise RuntimeError(f"not training {context.asset_key.to_user_string()}: {', '.join(failed)} failed earlier in this "
                           "run; fix that and run the job again (what finished is cached)")


def too_many_epochs(config: TrainConfig, examples: int) -> str | None:
    steps = total_steps(config, examples)
    if (epochs := steps * config.batch_size / examples) <= MANY_EPOCHS:
        return None
    return (f"{steps} steps of batch_size {config.batch_size} make {epochs:.0f} passes over the {examples} training examples "
            "(max_steps overrides num_epochs): more data, or fewer steps?")


def save_checkpoint(client, out: Path, rows: list[dict], telemetry: dict, loss_key: str, eval_key: str) -> dict:
    """Sampler weights (HF dir), resumable state, per-step metrics, the loss curve and, when
    the rows carry them, reward and KL curves."""
    client.save_weights_for_sampler(out / "model")
    client.save_state(out / "state")
    (out / "metrics.jsonl").write_text(to_jsonl(rows))
    plots.loss_curve(rows, out / "loss_curve.png", loss_key, eval_key)
    extra = plots.extra_curves(rows, out)
    final_eval = {k: v for k, v in [r for r in rows if eval_key in r][-1].items() if k.startswith("test/")}
    return {"steps": len(rows), loss_key: rows[-1][loss_key], **final_eval,
            "train_tokens": sum(r["num_tokens"] for r in rows), **telemetry, "plots": ["loss_curve.png", *extra]}


def checkpoint_asset(recipe: str, algorithm: Algorithm, config_cls: type[TrainConfig], stage: str = "checkpoint",
                     partitions_def: PartitionsDefinition | None = None, description: str | None = None):
    """`stage` and `partitions_def`: a sweep's `<recipe>/sweep_checkpoint`, one partition per
    point, whose artifacts are the recipe's checkpoints at the points' configs (same fingerprints)."""
    stages = ("tokenized", "base_model", *algorithm.inputs)  # this order is the manifest's upstream order

    @asset(key=key(recipe, stage), group_name=recipe, code_version=algorithm.checkpoint_version,
           kinds={"pytorch", "huggingface"}, **TRAINING_STEP, ins={s: AssetIn(key=key(recipe, s)) for s in stages},
           partitions_def=partitions_def, description=description or algorithm.checkpoint_description)
    def _checkpoint(context: AssetExecutionContext, config: config_cls, store: ArtifactStore, backend: TrainingBackendResource,
                    tracking: TrackingResource, **inputs: ArtifactRef) -> Output[ArtifactRef]:
        config.check(context.asset_key.to_user_string())
        refuse_after_failures(context)
        upstream = {s: inputs[s] for s in stages}
        if warning := too_many_epochs(config, store.manifest(upstream["tokenized"].fingerprint)["summary"]["train_rows"]):
            context.log.warning(warning)

        def build(out: Path, work: Path) -> dict:
            if algorithm.data_parallel and config.nproc_per_node > 1:
                return launch_torchrun(context, backend, algorithm, config, upstream, out, work)
            client = backend.create_training_client(upstream["base_model"].dir, config.lora_rank, config.seed)
            rows, telemetry = algorithm.train(TrainingRun(client, config, upstream, backend, work, context.log.info))
            return save_checkpoint(client, out, rows, telemetry, algorithm.loss_key, algorithm.eval_key)

        output = cached_artifact(context, store, config=config.model_dump(), upstream=upstream,
                                 build=build, backend=backend.identity(), same_as=f"{recipe}/checkpoint")
        # the enabled tracking sinks (MLflow, TensorBoard) get the checkpoint, trained now or cached
        tracking.record_checkpoint(output.value, store.manifest(output.value.fingerprint), context.log.info)
        return output

    return _checkpoint
