"""Every run config a user is shown is valid for the job it names: each file in examples/
(against the job its header's `dagster job execute -m crucible_jobs -j <job>` line names)
and each ```yaml block in README.md and docs/ (against the recipe its op names belong to; a
sweep spec as `crucible sweep run` checks it).
A renamed field or a misspelt choice in the docs fails here, not in a new user's hands.
Validation only (Dagster's own config check); the examples that train are run elsewhere."""

import re
from pathlib import Path

import pytest
import yaml
from dagster import validate_run_config

from crucible_assets.sweeps.spec import parse
from crucible_jobs import defs
from crucible_jobs.sweeps import check

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("sweep_"))  # sweep specs: test_sweeps.py
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LINE = re.compile(r"dagster job execute -m crucible_jobs -j (\w+) -c (\S+)")


def example_job(path: Path) -> str:
    jobs = {job for job, file in RUN_LINE.findall(path.read_text()) if file.endswith(path.name)}
    assert len(jobs) == 1, f"{path.name}: its header must show the one command that runs it, found {jobs}"
    return jobs.pop()


def doc_blocks() -> list[tuple[str, dict]]:
    blocks = []
    for doc in DOCS:
        for i, text in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            blocks.append((f"{doc.relative_to(REPO)}#{i}", yaml.safe_load(text)))
    return blocks


def jobs_for(config: dict) -> list[str]:
    """The recipe a block's ops belong to; a resources-only block applies to any: sl_basic."""
    recipes = {op.split("__")[0] for op in config.get("ops", {})}
    return sorted(recipes) or ["sl_basic"]


def assert_valid(job: str, config: dict, where: str) -> None:
    try:
        validate_run_config(defs.resolve_job_def(job), config)
    except Exception as e:  # Dagster's config error lists every bad path
        pytest.fail(f"{where} is not a valid run config for job {job}: {e}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_its_job(path):
    assert_valid(example_job(path), yaml.safe_load(path.read_text()), f"examples/{path.name}")


@pytest.mark.parametrize("where,config", doc_blocks(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_yaml_block_is_valid_for_its_recipe(where, config):
    if "axes" in config:  # a sweep spec (docs/recipes.md#sweeps): checked as `crucible sweep run` checks it
        assert check(parse(config, where), where)
        return
    for job in jobs_for(config):
        assert_valid(job, config, where)


def test_every_example_and_doc_block_is_checked():
    assert len(EXAMPLES) >= 7 and len(doc_blocks()) >= 6
