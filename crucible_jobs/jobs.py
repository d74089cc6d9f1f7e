"""One asset job per recipe, selecting the recipe's group and its whole upstream chain;
cached ancestors cost nothing. In-process so torch is imported once per run."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from recipes import chat_sl, distillation, dpo, math_rl, sl_basic

RECIPES = [sl_basic, chat_sl, dpo, math_rl, distillation]


def recipe_job(name: str):
    return define_asset_job(
        name,
        selection=AssetSelection.groups(name).upstream(),
        executor_def=in_process_executor,
        description=f"Materialize the {name} recipe end to end.",
    )
