"""One asset job per recipe, selecting the recipe's group and its whole upstream chain;
cached ancestors cost nothing. In-process by default so torch is imported once per run; a
cluster deployment passes its executor (deploy/k8s, deploy/celery)."""

from dagster import AssetSelection, ExecutorDefinition, define_asset_job, in_process_executor

from recipes import chat_sl, distillation, dpo, math_rl, sl_basic

RECIPES = [sl_basic, chat_sl, dpo, math_rl, distillation]


def recipe_job(name: str, executor: ExecutorDefinition = in_process_executor):
    return define_asset_job(
        name,
        selection=AssetSelection.groups(name).upstream(),
        executor_def=executor,
        description=f"Materialize the {name} recipe end to end.",
    )
