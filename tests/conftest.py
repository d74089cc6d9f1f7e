"""Shared fixtures: a tiny run config for the recipe jobs and isolated Crucible/Dagster homes."""

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The precision every test that compares numbers runs at, whatever `precision: auto` would
# pick on the machine (bf16 where a CPU measures it faster): a threshold means the same everywhere.
PINNED_PRECISION = {"backend": {"config": {"local": {"precision": "fp32"}}}}
# Small enough for the default test run, big enough that training measurably helps.
TINY_RUN_CONFIG = {
    "resources": PINNED_PRECISION,
    "ops": {
        "base__tiny_llama": {"config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        "sl_basic__dataset": {"config": {"num_examples": 600}},
        "sl_basic__checkpoint": {"config": {"max_steps": 40, "eval_every": 20, "save_every": 10}},
        "sl_basic__eval_report": {"config": {"max_tokens": 12, "bootstrap_samples": 300}},
        "chat_sl__dataset": {"config": {"num_examples": 400}},
        "chat_sl__checkpoint": {"config": {"max_steps": 30, "eval_every": 15, "save_every": 15, "learning_rate": 3e-3}},
        "chat_sl__eval_report": {"config": {"max_tokens": 12, "bootstrap_samples": 300}},
        "dpo__dataset": {"config": {"num_examples": 300}},
        "dpo__pairs": {"config": {"samples_per_prompt": 2, "max_tokens": 12}},
        "dpo__checkpoint": {"config": {"max_steps": 20, "eval_every": 10, "save_every": 10}},
        "dpo__eval_report": {"config": {"max_tokens": 12, "bootstrap_samples": 300}},
        "math_rl__dataset": {"config": {"num_examples": 200}},
        "math_rl__checkpoint": {"config": {"max_steps": 6, "batch_size": 4, "group_size": 4, "max_tokens": 8,
                                           "eval_every": 3, "save_every": 3, "eval_problems": 8}},
        "math_rl__eval_report": {"config": {"bootstrap_samples": 300, "pass_k": 2, "samples_per_problem": 2}},
        # the eval suites on a few prompts: what they measure is tested in test_suites.py and the acceptance chains
        **{f"{recipe}__eval_{suite}": {"config": {"num_prompts": n, "bootstrap_samples": 300, **extra}}
           for recipe in ("sl_basic", "chat_sl", "dpo", "math_rl", "distillation")
           for suite, n, extra in (("robustness", 16, {"max_tokens": 12}), ("self_consistency", 16, {"max_tokens": 12, "k": 3}),
                                   ("attribution", 2, {"steps": 16}))},
    }
}


@pytest.fixture(autouse=True)
def restore_thread_count():
    """torch's thread count is process-wide: a test that pins it (or an in-process run with
    `threads` set) would otherwise change the numbers of every later in-process run, so a run
    compared against a subprocess (which starts at torch's default) would differ in its bytes."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """A fresh CRUCIBLE_HOME and DAGSTER_HOME for one test."""
    crucible, dagster = tmp_path / "crucible", tmp_path / "dagster"
    dagster.mkdir()
    monkeypatch.setenv("CRUCIBLE_HOME", str(crucible))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster))
    return crucible, dagster


def tree_digest(root: Path) -> str:
    """Hash of every file's name and bytes under root (missing root hashes as empty)."""
    h = hashlib.sha256()
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def run_job(name: str, run_config: dict, raise_on_error: bool = True, assets: list[str] | None = None):
    """`assets`: materialize only these keys of the job (e.g. up to the checkpoint)."""
    from dagster import AssetKey, DagsterInstance

    from crucible_jobs import defs

    job = defs.resolve_job_def(name)
    selection = [AssetKey.from_user_string(k) for k in assets] if assets else None
    with DagsterInstance.get() as instance:
        return job.execute_in_process(run_config=config_for(name, run_config, selection), instance=instance,
                                      raise_on_error=raise_on_error, asset_selection=selection)


def config_for(name: str, run_config: dict, selection=None) -> dict:
    """One shared config for every recipe: keep the ops that job `name` (or its `selection`) has."""
    from crucible_jobs import defs

    job = defs.resolve_job_def(name)
    ops = {n.name for n in (job.get_subset(asset_selection=set(selection)) if selection else job).graph.nodes}
    return {**run_config, "ops": {k: v for k, v in run_config.get("ops", {}).items() if k in ops}}


# Seconds to import each (measured on the CI machine type); loading the Definitions and a run of
# cache hits need none of them.
HEAVY_LIBRARIES = ("torch", "transformers", "great_expectations", "tinker", "peft", "pandas", "matplotlib", "mlflow", "datasets")


def heavy_imports_after(code: str) -> tuple[list[str], str]:
    """Runs `code` in a fresh interpreter (tests/ importable); returns which HEAVY_LIBRARIES it
    imported, and its stdout before that report."""
    probe = f"{code}\nimport sys\nprint([m for m in {HEAVY_LIBRARIES!r} if m in sys.modules])"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", probe], env=env_with(PYTHONPATH=path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    *out, report = done.stdout.splitlines()
    return ast.literal_eval(report), "\n".join(out)


def execute_job(job: str, run_config: dict, homes, tmp_path: Path, **env) -> str:
    """`dagster job execute -m crucible_jobs -j <job> -c <config>` in a subprocess, as a user runs
    it, in these homes with `env` added (a key only there); its stderr, after it succeeded."""
    import yaml

    path = tmp_path / f"{job}.yaml"
    path.write_text(yaml.safe_dump(config_for(job, run_config)))
    done = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-m", "crucible_jobs", "-j", job, "-c", str(path)],
                          env=env_with(CRUCIBLE_HOME=str(homes[0]), DAGSTER_HOME=str(homes[1]), **env),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def env_with(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """One tiny model on the base tokenizer, built once for every unit test that trains."""
    from crucible_assets.base import build_tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    train_tokenizer(root / "tok", 1024, 0)
    build_tiny_llama(root / "tok", root / "model", 64, 2, 4, 128, 256, 0)
    return root / "model"


def require_system_package(found: bool, what: str, package: str) -> None:
    """A test that needs a Debian package skips on a developer's machine without it, but
    fails under CI, where .ci/run installs it: a broken install step must not pass as a skip."""
    if found:
        return
    skip_or_fail_under_ci(f"{what} is not installed (Debian: apt-get install {package}; .ci/run installs it)")


def skip_or_fail_under_ci(message: str) -> None:
    """What a developer's machine may lack, CI has: there a missing capability is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
