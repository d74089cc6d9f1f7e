"""Definitions in one place: every recipe's own Definitions (assets, checks, job), the shared
base, the feedback loop's assets, resources, and the automation (schedules, sensors), all
stopped by default."""

import warnings

from dagster import BetaWarning, Definitions, ExecutorDefinition, PreviewWarning, define_asset_job, in_process_executor

from crucible_assets import api_data, feedback
from crucible_assets.base import BASE_ASSETS
from crucible_assets.io_manager import ArtifactIOManager
from crucible_assets.recipe import recipe_definitions
from crucible_jobs.automation import FOLLOW_UPSTREAM, follow_upstream_sensor
from crucible_jobs.schedules import recipe_schedule
from crucible_jobs.sensors import drop_folder_sensor, feedback_sensors
from crucible_jobs.sweeps import sweep_launch_job
from recipes import RECIPES
from resources.api_models.resource import ApiModelsResource
from resources.backends.resource import TrainingBackendResource
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from resources.tracking import TrackingResource

# Dagster 1.13 marks APIs we rely on as beta or preview (Output's data_version,
# Definitions.map_asset_specs) and warns on every use; dagster is pinned to 1.13.* and the
# tests cover those paths, so the warnings say nothing a user can act on.
warnings.filterwarnings("ignore", category=BetaWarning)
warnings.filterwarnings("ignore", category=PreviewWarning)

# Shown on every asset in the UI: who to ask about a recipe's outputs.
OWNERS = ["team:post-training"]

feedback_job = define_asset_job(feedback.GROUP, selection=[a.key for a in feedback.assets], executor_def=in_process_executor,
                                description="Ingest the feedback folder and curate SFT examples and DPO pairs from it.")


def with_owners_and_automation(spec):
    """Every asset with an upstream re-materializes when one of its upstreams gets a new
    version (a new sl_basic model retrains chat_sl, then dpo); roots (datasets, the base
    tokenizer) change only through config, the drop folder or a schedule."""
    spec = spec.replace_attributes(owners=OWNERS)
    # sweep points (partitioned) and a sweep's report are experiments a user runs, never retrained behind their back;
    # data written by a hosted model costs money per call: only a person starts it
    followed = (spec.deps and spec.partitions_def is None and spec.key.path[-1] != "sweep_report"
                and spec.group_name != api_data.GROUP)
    return spec.replace_attributes(automation_condition=FOLLOW_UPSTREAM) if followed else spec


def build_defs(executor: ExecutorDefinition = in_process_executor) -> Definitions:
    """`executor` runs every recipe job: in-process here, one pod or worker per step on a
    cluster (deploy/k8s/definitions.py, deploy/celery/definitions.py)."""
    store = ArtifactStore()
    shared = Definitions(
        assets=BASE_ASSETS + feedback.assets + api_data.assets,
        jobs=[feedback_job, sweep_launch_job, *api_data.jobs],
        schedules=[recipe_schedule(r.name) for r in RECIPES],
        sensors=[drop_folder_sensor(r.name) for r in RECIPES] + feedback_sensors() + [follow_upstream_sensor],
        resources={
            "store": store,
            "registry": ModelRegistry(),
            "backend": TrainingBackendResource(),
            "tracking": TrackingResource(),  # MLflow / TensorBoard sinks, off unless run config turns them on
            "models": ApiModelsResource(),  # a hosted judge (judge_eval), unset unless run config names one
            "io_manager": ArtifactIOManager(store=store),
        },
    )
    merged = Definitions.merge(*(recipe_definitions(r, executor) for r in RECIPES), shared)
    return merged.map_asset_specs(func=with_owners_and_automation)


defs = build_defs()
