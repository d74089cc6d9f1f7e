"""Definitions in one place: every recipe's assets and checks, the shared base, resources, jobs."""

from dagster import Definitions, map_asset_specs

from crucible_assets.base_assets import BASE_ASSETS
from crucible_assets.io_manager import ArtifactIOManager
from crucible_jobs.jobs import RECIPES, recipe_job
from resources.artifact_store import ArtifactStore
from resources.backend import TrainingBackendResource
from resources.registry import ModelRegistry
from resources.tracking import TrackingResource

# Shown on every asset in the UI: who to ask about a recipe's outputs.
OWNERS = ["team:post-training"]

store = ArtifactStore()

defs = Definitions(
    assets=map_asset_specs(lambda spec: spec.replace_attributes(owners=OWNERS),
                           BASE_ASSETS + [a for r in RECIPES for a in r.assets]),
    asset_checks=[c for r in RECIPES for c in r.checks],
    jobs=[recipe_job(r.NAME) for r in RECIPES],
    resources={
        "store": store,
        "registry": ModelRegistry(),
        "backend": TrainingBackendResource(),
        "tracking": TrackingResource(),  # MLflow / TensorBoard sinks, off unless run config turns them on
        "io_manager": ArtifactIOManager(store=store),
    },
)
