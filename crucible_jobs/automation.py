"""What runs started without a person share: their run config, and the declarative rule
that lets downstream assets follow upstream changes.

Nobody passes `-c` to a scheduled or sensor-started run, so such a run of recipe `r` takes
its run config from `$CRUCIBLE_HOME/automation/r.yaml` when that file exists (the same
shape as `dagster job execute -c`), else the recipe's defaults."""


import copy

import yaml
from dagster import AssetSelection, AutomationCondition, AutomationConditionSensorDefinition

from resources.store.home import crucible_home

# AutomationCondition.eager() minus its `newly_missing` branch: eager would also build every
# asset that was never materialized on the sensor's first tick, i.e. train every recipe with
# its defaults the moment automation is turned on. This one only reacts to upstream updates.
FOLLOW_UPSTREAM = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_missing()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("follow_upstream")


# Stopped by default, like every schedule and sensor here: an upstream change retrains
# whole recipes, which a user turns on deliberately (UI, or `dagster sensor start`).
follow_upstream_sensor = AutomationConditionSensorDefinition(
    "follow_upstream", target=AssetSelection.all(),
    description="Re-materializes assets whose upstream got a new version (runs include their blocking checks).",
)


def automation_run_config(recipe: str) -> dict:
    path = crucible_home() / "automation" / f"{recipe}.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping (run config), got {type(config).__name__}")
    return config or {}


def with_dataset(run_config: dict, recipe: str, path: str) -> dict:
    """`run_config` with recipe's dataset read from the local file `path` (jsonl or parquet),
    all of it unless the run config caps `num_examples` (a recipe's default cap is sized
    for its synthetic generator, not for a user's file)."""
    merged = copy.deepcopy(run_config)
    dataset = merged.setdefault("ops", {}).setdefault(f"{recipe}__dataset", {}).setdefault("config", {})
    dataset.update(source="parquet" if path.endswith(".parquet") else "jsonl", path=path)
    dataset.setdefault("num_examples", 0)
    return merged
