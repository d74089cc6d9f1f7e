"""The layout's promises: the new-recipe example in docs/own_data.md builds (read from the
doc itself, so the two cannot drift), modules stay small, and `Recipe.problems()` refuses a
config that drops a base field's rule. Builds Definitions only; nothing is materialized."""

import dataclasses
import re
from pathlib import Path

import pytest
from pydantic import PositiveInt

import crucible_jobs.definitions as definitions
import recipes
from crucible_assets.recipe import Recipe, dropped_rules, recipe_definitions
from crucible_assets.sweeps.assets import SWEEP_STAGES
from crucible_assets.train import sft
from recipes import RECIPES

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- example-recipe:"
STAGES = ("base_model", "dataset", "tokenized", "checkpoint", "eval_report", "champion_eval", "registered_model",
          "eval_robustness", "eval_self_consistency", "eval_attribution", "judge_eval")


def doc_example() -> str:
    doc = (ROOT / "docs" / "own_data.md").read_text()
    assert doc.count(MARKER) == 1, f"docs/own_data.md must hold exactly one {MARKER!r} comment"
    block = re.match(r".*?-->\s*```python\n(.*?)```", doc[doc.index(MARKER):], re.S)
    assert block, f"no ```python block after {MARKER!r} in docs/own_data.md"
    return block.group(1)


@pytest.fixture
def discovered(tmp_path, monkeypatch) -> list[Recipe]:
    """The doc's file dropped into the recipes package (a second folder on its path, so the
    source tree stays untouched) and found by the package's own discovery."""
    (tmp_path / "sl_accuracy.py").write_text(doc_example())
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(tmp_path)])
    return recipes.discover()


def test_doc_example_is_short():
    assert len(doc_example().splitlines()) < 40


def test_doc_example_recipe_builds(discovered, monkeypatch):
    """One file in recipes/ and nothing else: discovery finds it, Definitions build it."""
    assert {r.name for r in discovered} == {r.name for r in RECIPES} | {"sl_accuracy"}
    example = next(r for r in discovered if r.name == "sl_accuracy")
    name = example.name
    assert example.problems() == []
    monkeypatch.setattr(definitions, "RECIPES", discovered)  # definitions read the list at import
    repo = definitions.build_defs().get_repository_def()

    job = repo.get_job(name)
    group = {f"{name}/{stage}" for stage in STAGES}
    swept = {f"{name}/{stage}" for stage in SWEEP_STAGES}
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys() if k.path[0] == name} == group | swept
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == group | {"base/tokenizer", "base/tiny_llama"}
    sweep_job = repo.get_job(f"{name}_sweep")  # a sweep of the new recipe needs nothing more either
    assert {k.to_user_string() for k in sweep_job.asset_layer.executable_asset_keys} == (
        group - {f"{name}/{s}" for s in ("checkpoint", "eval_report", "champion_eval", "registered_model", "eval_robustness",
                                          "eval_self_consistency", "eval_attribution", "judge_eval")}
        | swept - {f"{name}/sweep_report"} | {"base/tokenizer", "base/tiny_llama"})

    checks = {(ck.asset_key.to_user_string(), ck.name): ck for ck in repo.asset_graph.asset_check_keys}
    gate = repo.asset_graph.get_check_spec(checks[(f"{name}/eval_report", "beats_starting_model")])
    assert "test/accuracy_delta" in gate.description and "above zero" in gate.description
    assert (f"{name}/registered_model", "beats_champion") in checks
    assert (f"{name}/tokenized", "length_distribution") in checks
    assert {f"{name}_retrain"} <= {s.name for s in repo.schedule_defs}
    assert {f"{name}_drop_folder"} <= {s.name for s in repo.sensor_defs}

    # recipe_definitions alone, as the doc describes it: the jobs and the group, nothing else
    own = recipe_definitions(example)
    assert [j.name for j in own.jobs] == [name, f"{name}_sweep"]
    assert {k.to_user_string() for a in own.assets for k in a.keys} == group | swept


def module_lengths(pattern: str) -> dict[str, int]:
    return {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sorted(ROOT.glob(pattern))}


def test_modules_stay_small():
    modules = {}
    for package in ("crucible_assets", "crucible_jobs", "resources"):
        modules |= module_lengths(f"{package}/**/*.py")
    assert modules, "no modules found"
    assert {m: n for m, n in modules.items() if n > 400} == {}
    recipe_files = module_lengths("recipes/*.py")
    assert len(recipe_files) > len(RECIPES)  # every recipe's file plus __init__.py
    assert {m: n for m, n in recipe_files.items() if n >= 80} == {}


def test_problems_catch_a_dropped_rule():
    class LooseTrain(sft.SftConfig):
        batch_size: int = 16  # PositiveInt's `>= 1` is gone

    class TightTrain(sft.SftConfig):
        batch_size: PositiveInt = 16  # a new default, the same rule

    assert len(dropped_rules(LooseTrain, sft.SftConfig)) == 1
    recipe = dataclasses.replace(RECIPES[0], name="loose", train=LooseTrain)
    found = recipe.problems()
    assert len(found) == 1 and "LooseTrain.batch_size" in found[0], found
    with pytest.raises(ValueError, match="recipe loose: .*batch_size"):
        recipe_definitions(recipe)
    assert dataclasses.replace(RECIPES[0], name="tight", train=TightTrain).problems() == []
