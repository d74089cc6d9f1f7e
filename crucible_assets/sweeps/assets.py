"""A recipe's sweep assets: `<recipe>/sweep_checkpoint` and `<recipe>/sweep_eval`, partitioned
by sweep point (dynamic partitions `<recipe>_sweep_points`), built by the same factories as
the recipe's checkpoint and eval report, so a point trains and evaluates exactly as a run
would; and `<recipe>/sweep_report`, which compares one sweep's points. The job
`<recipe>_sweep` runs one point per partition, with its shared upstream (dataset,
tokenized, starting model, reference log-probs...) cached across points: the partitioned run
config gives every point the sweep's base config, so they all hit the same fingerprints."""


import json
from pathlib import Path

from dagster import (AssetDep, AssetExecutionContext, AssetSelection, Config, DynamicPartitionsDefinition, ExecutorDefinition,
                     Output, PartitionedConfig, asset, define_asset_job)
from pydantic import Field

from crucible_assets.caching import cached_artifact, key
from crucible_assets.eval_report import eval_report_asset
from crucible_assets.evaluation import EvalConfig
from crucible_assets.sweeps import report, spec
from crucible_assets.train.algorithm import Algorithm
from crucible_assets.train.checkpoint import checkpoint_asset
from crucible_assets.train.loop import TrainConfig
from resources.store.artifact_store import ArtifactStore


SWEEP_STAGES = ("sweep_checkpoint", "sweep_eval", "sweep_report")  # in the recipe's group, not in its job


def points_partitions(recipe: str) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"{recipe}_sweep_points")


class SweepReportConfig(Config):
    sweep: str = Field(default="", description="the sweep to report (its spec's name); '' = the one run last for this recipe")


def report_ref_key(recipe: str, sweep: str) -> str:
    """Each sweep's latest report, next to the asset's own latest (whichever sweep that was)."""
    return f"{recipe}/sweep_report/{sweep}"


def last_sweep(recipe: str) -> str:
    specs = [p for p in spec.sweeps_dir().glob("*.json")
             if json.loads(p.read_text())["recipe"] == recipe] if spec.sweeps_dir().is_dir() else []
    if not specs:
        raise KeyError(f"no sweep of {recipe} has been run; `crucible sweep run SPEC.yaml` first")
    return max(specs, key=lambda p: p.stat().st_mtime).stem


def sweep_report_asset(recipe: str, metric: str, higher_is_better: bool):
    @asset(key=key(recipe, "sweep_report"), group_name=recipe, code_version="2", kinds={"json"},
           deps=[AssetDep(key(recipe, "sweep_eval"))],
           description=f"One sweep of {recipe} compared: every point's metrics with CIs, each configuration's mean and "
                       "seed spread, the best configuration by the gate metric and whether it beats the runner-up "
                       "(paired by seed, Bonferroni-corrected); a plot of the metric against each axis.")
    def _sweep_report(context: AssetExecutionContext, config: SweepReportConfig, store: ArtifactStore) -> Output:
        sweep = spec.load(config.sweep or last_sweep(recipe))
        if sweep.recipe != recipe:
            raise ValueError(f"sweep {sweep.name} sweeps {sweep.recipe}, not {recipe}")
        evals = {}
        for point in spec.points(sweep):
            try:
                evals[point] = store.latest_verified(f"{recipe}/sweep_eval/{point}")
            except FileNotFoundError:
                continue  # not run yet: listed as missing in the report

        def build(out: Path, _work: Path) -> dict:
            reports = {p: json.loads((ref.dir / "report.json").read_text()) for p, ref in evals.items()}
            summary = report.summarize(sweep, reports, metric, higher_is_better)
            (out / "report.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
            (out / "report.md").write_text(report.markdown(summary))
            report.plot(summary, out / "metric_by_axis.png")
            return {"sweep": sweep.name, "points_done": len(reports), "points_missing": len(summary["missing"]),
                    "verdict": report.verdict(summary), "plots": ["metric_by_axis.png"]}

        output = cached_artifact(context, store, config={"sweep": sweep.model_dump(mode="json")}, upstream=evals, build=build)
        store.set_latest(output.value.model_copy(update={"key": report_ref_key(recipe, sweep.name)}))
        verdict = store.manifest(output.value.fingerprint)["summary"]["verdict"]
        context.log.info(f"sweep {sweep.name}: {verdict}; report: {output.value.dir / 'report.md'}")
        return output

    return _sweep_report


def sweep_assets(recipe: str, algorithm: Algorithm, train: type[TrainConfig], evaluate: type[EvalConfig], metric: str,
                 higher_is_better: bool) -> list:
    partitions = points_partitions(recipe)
    return [
        checkpoint_asset(recipe, algorithm, train, stage="sweep_checkpoint", partitions_def=partitions,
                         description=f"One sweep point of {recipe}'s training (a partition per point; its config is "
                                     "the sweep's base config plus the point's values)."),
        eval_report_asset(recipe, algorithm, evaluate, stage="sweep_eval", checkpoint="sweep_checkpoint",
                          partitions_def=partitions, description=f"One sweep point's {recipe} eval report against the "
                                                                 "starting model (a partition per point)."),
        sweep_report_asset(recipe, metric, higher_is_better),
    ]


def sweep_job(recipe: str, executor: ExecutorDefinition, console: dict):
    partitions = points_partitions(recipe)

    def point_config(point: str) -> dict:
        return {**console, **spec.run_config(spec.sweep_of(point), point)}

    return define_asset_job(f"{recipe}_sweep", selection=AssetSelection.assets(key(recipe, "sweep_eval")).upstream(),
                            partitions_def=partitions, executor_def=executor,
                            config=PartitionedConfig(partitions, run_config_for_partition_key_fn=point_config),
                            description=f"One point of a {recipe} sweep (pick partitions to run several; "
                                        "`crucible sweep run SPEC.yaml` adds them and runs them all).")
