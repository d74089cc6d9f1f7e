"""Sensors that start retraining without a person: a drop folder per recipe, and the
feedback loop (enough new curated examples, or the champion's ratings falling, rebuild the
curated data; new curated data retrains chat_sl and dpo). All stopped by default.

Every run they start is the recipe's whole job, so a new version reaches the registry only
through the blocking checks: the dataset checks, then the eval report's gate."""


import json
import os
from pathlib import Path

from dagster import (AssetKey, DefaultSensorStatus, EventLogEntry, RunRequest, SensorEvaluationContext, SensorResult,
                     SkipReason, asset_sensor, sensor)
from pydantic import BaseModel, Field

from crucible_assets.feedback import CURATED, GROUP, CurationConfig, feedback_folder, load_feedback, rating_drop, sft_examples
from crucible_jobs.automation import automation_run_config, with_dataset
from resources.store.home import crucible_home
from resources.store.registry import ModelRegistry

DATA_SUFFIXES = (".jsonl", ".parquet")


def drop_folder() -> Path:
    return Path(os.environ.get("CRUCIBLE_DROP_DIR") or crucible_home() / "drop").expanduser()


def _stamps(folder: Path) -> dict[str, str]:
    """name -> mtime:size of the complete data files (dotfiles are still being written)."""
    files = [p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and not p.name.startswith(".") and p.is_file()] \
        if folder.is_dir() else []
    return {p.name: f"{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in sorted(files)}


def drop_folder_sensor(recipe: str):
    """A data file that appears (or changes) in `<drop folder>/<recipe>/` starts the recipe's job
    on it; the cursor remembers which files, at which mtime and size, already did."""
    @sensor(name=f"{recipe}_drop_folder", job_name=recipe, minimum_interval_seconds=15, default_status=DefaultSensorStatus.STOPPED,
            description=f"Trains {recipe} on each new *.jsonl / *.parquet in $CRUCIBLE_DROP_DIR/{recipe} "
                        f"(default $CRUCIBLE_HOME/drop/{recipe}).")
    def _sensor(context: SensorEvaluationContext) -> SensorResult:
        folder = drop_folder() / recipe
        seen = json.loads(context.cursor) if context.cursor else {}
        stamps = _stamps(folder)
        new = [name for name, stamp in stamps.items() if seen.get(name) != stamp]
        if not new:
            return SensorResult(skip_reason=SkipReason(f"no new data files in {folder}"))
        base = automation_run_config(recipe)
        return SensorResult(
            run_requests=[RunRequest(run_key=f"{name}@{stamps[name]}", run_config=with_dataset(base, recipe, str(folder / name)),
                                     tags={"crucible/trigger": "drop_folder", "crucible/dropped_file": name}) for name in new],
            cursor=json.dumps(stamps, sort_keys=True))

    return _sensor


class FeedbackTriggers(BaseModel):
    model: str = Field(default="chat_sl", description="the registered model whose champion's ratings are watched")
    min_new_examples: int = Field(default=50, description="curate when this many SFT examples were added since the last time")
    rating_window: int = Field(default=20, description="records in the baseline (the champion's first) and the recent window")
    max_rating_drop: float = Field(default=0.5, description="curate when the recent mean rating is this far below the baseline")


def _min_rating(run_config: dict) -> float:
    ops = run_config.get("ops", {})
    return ops.get(f"{GROUP}__sft_examples", {}).get("config", {}).get("min_rating", CurationConfig().min_rating)


def feedback_sensor(triggers: FeedbackTriggers = FeedbackTriggers()):
    """Starts the `feedback` job (re-curation), which in turn retrains through the sensors below.
    The cursor holds the SFT-example count at the last trigger and the champions whose rating
    drop already triggered once."""
    @sensor(name="feedback_retraining", job_name=GROUP, minimum_interval_seconds=60, default_status=DefaultSensorStatus.STOPPED,
            description=f"Re-curates feedback (then retrains) on {triggers.min_new_examples} new SFT examples or a rating "
                        f"drop of {triggers.max_rating_drop} for the {triggers.model} champion.")
    def _sensor(context: SensorEvaluationContext, registry: ModelRegistry) -> SensorResult:
        folder = feedback_folder()
        if not any(folder.glob("*.jsonl")):
            return SensorResult(skip_reason=SkipReason(f"no feedback files in {folder}"))
        run_config = automation_run_config(GROUP)
        records = load_feedback(folder)  # a bad record fails the tick, naming file, line and field
        examples = len(sft_examples(records, _min_rating(run_config)))
        state = json.loads(context.cursor) if context.cursor else {"examples": 0, "dropped": []}
        reasons = []
        if examples - state["examples"] >= triggers.min_new_examples:
            reasons.append(f"{examples - state['examples']} new SFT examples")
        try:
            champion = f"{triggers.model}:{registry.resolve(f'{triggers.model}@champion')['version']}"
        except KeyError:
            champion = None
        drop = rating_drop(records, champion, triggers.rating_window) if champion else None
        if drop is not None and drop >= triggers.max_rating_drop and champion not in state["dropped"]:
            reasons.append(f"{champion}'s mean rating fell {drop:.2f} below its baseline")
            state["dropped"].append(champion)
        if not reasons:
            return SensorResult(skip_reason=SkipReason(f"{examples} SFT examples ({state['examples']} at the last trigger); "
                                                       f"{champion or 'no champion'}'s rating drop: {drop}"))
        context.log.info("; ".join(reasons))
        state["examples"] = examples
        run_config = {**run_config, "ops": {**run_config.get("ops", {}), f"{GROUP}__dataset": {"config": {"folder": str(folder)}}}}
        return SensorResult(run_requests=[RunRequest(run_key=f"{examples}:{','.join(state['dropped'])}", run_config=run_config,
                                                     tags={"crucible/trigger": "feedback"})],
                            cursor=json.dumps(state))

    return _sensor


def retrain_on_curated_sensor(stage: str, file: str, recipe: str):
    """Each new version of feedback/`stage` (run key: its data version) trains `recipe` on it."""
    @asset_sensor(asset_key=AssetKey([GROUP, stage]), job_name=recipe, name=f"{recipe}_on_{GROUP}",
                  default_status=DefaultSensorStatus.STOPPED,
                  description=f"Trains {recipe} on each new version of {GROUP}/{stage}.")
    def _sensor(context: SensorEvaluationContext, asset_event: EventLogEntry):
        metadata = asset_event.asset_materialization.metadata
        rows, version = metadata["rows"].value, metadata["data_version"].value
        if rows < 2:
            return SkipReason(f"{GROUP}/{stage} version {version} has {rows} rows; a train/test split needs 2")
        path = str(Path(metadata["path"].value) / file)
        return RunRequest(run_key=version, run_config=with_dataset(automation_run_config(recipe), recipe, path),
                          tags={"crucible/trigger": f"{GROUP}/{stage}"})

    return _sensor


def feedback_sensors() -> list:
    return [feedback_sensor()] + [retrain_on_curated_sensor(stage, file, recipe) for stage, (file, recipe, *_) in CURATED.items()]
