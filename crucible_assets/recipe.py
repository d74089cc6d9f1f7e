"""A recipe is a spec: an algorithm, where it starts, its typed configs and its gate.
`recipe_definitions` turns one into its Dagster objects: the asset group `<recipe>/...`
(starting model, dataset, tokenized, the algorithm's own stages, checkpoint, eval report,
the champion's eval on the same set, registered model, and the sweep stages), the blocking
checks, the job that materializes the group with its whole upstream chain (cached ancestors
cost nothing) and the sweep job (crucible_assets/sweeps/). A new recipe is one file in recipes/."""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import AssetSelection, Definitions, ExecutorDefinition, define_asset_job, in_process_executor

from crucible_assets.caching import key
from crucible_assets.champion_eval import champion_eval_asset
from crucible_assets.checks import dataset_checks, eval_gate_check, length_check, promotion_gate_check
from crucible_assets.data import TokenizeConfig, dataset_asset, tokenized_asset
from crucible_assets.eval_report import eval_report_asset
from crucible_assets.gate import Gate, Guard  # noqa: F401 (recipes state their gates with these)
from crucible_assets.evaluation import EvalConfig
from crucible_assets.registration import registered_model_asset
from crucible_assets.starting_model import starting_model_asset
from crucible_assets.suites.assets import DEFAULT_SUITES, SUITES, eval_suite_asset, suite_stage
from crucible_assets.sweeps.assets import SWEEP_STAGES, sweep_assets, sweep_job
from crucible_assets.train.algorithm import Algorithm
from crucible_assets.train.checkpoint import checkpoint_asset
from crucible_assets.train.loop import TrainConfig
from resources.datasets.sources import DatasetConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    algorithm: Algorithm
    dataset: type[DatasetConfig]
    tokenize: type[TokenizeConfig]
    train: type[TrainConfig]
    gate: Gate
    lineage_edge: str  # the registry's name for the edge to the model it was trained from
    evaluate: type[EvalConfig] | None = None  # None: the algorithm's eval config
    start_from: str | None = None  # a recipe whose registered model is the default start; None: base/`base`
    base: str = "tiny_llama"
    models: dict[str, str] = field(default_factory=dict)  # the algorithm's other model stages -> the recipe each starts from
    lineage_stage: str = "base_model"  # the model stage the lineage edge points at (a teacher, say)
    suites: tuple[str, ...] = DEFAULT_SUITES  # eval suites (crucible_assets/suites/), each its asset <recipe>/eval_<suite>

    def problems(self) -> list[str]:
        """Mistakes in the spec itself, caught when the code location loads."""
        found = []
        if not issubclass(self.train, self.algorithm.train_config):
            found.append(f"train config {self.train.__name__} must subclass {self.algorithm.train_config.__name__}")
        if self.evaluate and not issubclass(self.evaluate, self.algorithm.eval_config):
            found.append(f"eval config {self.evaluate.__name__} must subclass {self.algorithm.eval_config.__name__}")
        if missing := set(self.algorithm.model_stages) - set(self.models):
            found.append(f"models must say where {sorted(missing)} start from (e.g. models={{'teacher': 'math_rl'}})")
        if unknown := set(self.suites) - set(SUITES):
            found.append(f"suites {sorted(unknown)} are not among {sorted(SUITES)}")
        if self.lineage_stage not in ("base_model", *self.models):
            found.append(f"lineage_stage {self.lineage_stage!r} is not one of the recipe's model stages")
        bases = [(self.train, self.algorithm.train_config), (self.evaluate, self.algorithm.eval_config),
                 (self.tokenize, TokenizeConfig), (self.dataset, DatasetConfig)]
        return found + [problem for cls, base in bases if cls for problem in dropped_rules(cls, base)]


def dropped_rules(cls: type, base: type) -> list[str]:
    """A subclass that re-declares a field as plain `int` to change its default silently drops
    the base's rule (`batch_size >= 1`); it must keep the base's type (`PositiveInt`)."""
    def shown(field) -> str:
        annotation = field.annotation.__name__ if isinstance(field.annotation, type) else repr(field.annotation)
        return ", ".join([annotation, *map(repr, field.metadata)])

    return [f"{cls.__name__}.{name} must keep the type of {base.__name__}.{name} ({shown(field)})"
            for name, field in base.model_fields.items()
            if name in cls.model_fields
            and (cls.model_fields[name].annotation, cls.model_fields[name].metadata) != (field.annotation, field.metadata)]


def recipe_assets(recipe: Recipe) -> list:
    name, algorithm = recipe.name, recipe.algorithm
    return [
        starting_model_asset(name, start_from=recipe.start_from, base=recipe.base),
        *(starting_model_asset(name, start_from=start, stage=stage) for stage, start in recipe.models.items()),
        dataset_asset(name, recipe.dataset, algorithm.data_kind),
        tokenized_asset(name, recipe.tokenize, algorithm.data_kind),
        *(stage(name) for stage in algorithm.stages),
        checkpoint_asset(name, algorithm, recipe.train),
        eval_report_asset(name, algorithm, recipe.evaluate or algorithm.eval_config),
        champion_eval_asset(name, algorithm, recipe.evaluate or algorithm.eval_config, recipe.gate.metric),
        *(eval_suite_asset(name, algorithm, SUITES[s]) for s in recipe.suites),
        registered_model_asset(name, recipe.lineage_edge, recipe.gate.metric, recipe.gate.higher_is_better,
                               recipe.lineage_stage, tuple(suite_stage(s) for s in recipe.suites)),
        *sweep_assets(name, algorithm, recipe.train, recipe.evaluate or algorithm.eval_config, recipe.gate.metric,
                      recipe.gate.higher_is_better),
    ]


def recipe_checks(recipe: Recipe) -> list:
    return [dataset_checks(recipe.name, recipe.algorithm.data_kind), length_check(recipe.name),
            eval_gate_check(recipe.name, recipe.gate), promotion_gate_check(recipe.name)]


# The job's default run config, merged under a user's `-c`: the terminal shows INFO and up
# (progress, cache hits, the run summary) and Dagster's per-event DEBUG lines stay in the event
# log and the UI; `-c` with `loggers: {console: {config: {log_level: DEBUG}}}` brings them back.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def recipe_definitions(recipe: Recipe, executor: ExecutorDefinition = in_process_executor) -> Definitions:
    """In-process by default so torch is imported once per run; a cluster deployment passes
    its executor (deploy/k8s, deploy/celery)."""
    if found := recipe.problems():
        raise ValueError(f"recipe {recipe.name}: " + "; ".join(found))
    swept = AssetSelection.assets(*(key(recipe.name, s) for s in SWEEP_STAGES))
    job = define_asset_job(recipe.name, selection=(AssetSelection.groups(recipe.name) - swept).upstream(), executor_def=executor,
                           description=f"Materialize the {recipe.name} recipe end to end.", config=QUIET_CONSOLE)
    return Definitions(assets=recipe_assets(recipe), asset_checks=recipe_checks(recipe),
                       jobs=[job, sweep_job(recipe.name, executor, QUIET_CONSOLE)])
