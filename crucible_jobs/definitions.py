"""Definitions in one place: every recipe's assets and checks, the shared base, the feedback
loop's assets, resources, jobs, and the automation (schedules, sensors), all stopped by default."""

from dagster import Definitions, ExecutorDefinition, define_asset_job, in_process_executor, map_asset_specs

from crucible_assets import feedback
from crucible_assets.base_assets import BASE_ASSETS
from crucible_assets.io_manager import ArtifactIOManager
from crucible_jobs.automation import follow_upstream, follow_upstream_sensor
from crucible_jobs.jobs import RECIPES, recipe_job
from crucible_jobs.schedules import recipe_schedule
from crucible_jobs.sensors import drop_folder_sensor, feedback_sensors
from resources.artifact_store import ArtifactStore
from resources.backend import TrainingBackendResource
from resources.registry import ModelRegistry
from resources.tracking import TrackingResource


# Shown on every asset in the UI: who to ask about a recipe's outputs.
OWNERS = ["team:post-training"]

feedback_job = define_asset_job(feedback.GROUP, selection=[a.key for a in feedback.assets], executor_def=in_process_executor,
                                description="Ingest the feedback folder and curate SFT examples and DPO pairs from it.")


def build_defs(executor: ExecutorDefinition = in_process_executor) -> Definitions:
    """`executor` runs every recipe job: in-process here, one pod or worker per step on a
    cluster (deploy/k8s/definitions.py, deploy/celery/definitions.py)."""
    store = ArtifactStore()
    return Definitions(
        assets=map_asset_specs(lambda spec: spec.replace_attributes(owners=OWNERS),
                               follow_upstream(BASE_ASSETS + [a for r in RECIPES for a in r.assets] + feedback.assets)),
        asset_checks=[c for r in RECIPES for c in r.checks],
        jobs=[recipe_job(r.NAME, executor) for r in RECIPES] + [feedback_job],
        schedules=[recipe_schedule(r.NAME) for r in RECIPES],
        sensors=[drop_folder_sensor(r.NAME) for r in RECIPES] + feedback_sensors() + [follow_upstream_sensor],
        resources={
            "store": store,
            "registry": ModelRegistry(),
            "backend": TrainingBackendResource(),
            "tracking": TrackingResource(),  # MLflow / TensorBoard sinks, off unless run config turns them on
            "io_manager": ArtifactIOManager(store=store),
        },
    )


defs = build_defs()
