"""Orchestration: `dagster job execute -m crucible_jobs -j sl_basic` (checks, content-addressed store,
registry, event log) against the same stages called bare (bench/bare_sl_basic.py), each a
fresh process; then the same job again, every asset a cache hit. Overhead is expressed as
a fraction of a one-minute job; the re-run as a fraction of the first run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.result import Row
from bench.scaling import disk_bytes
from crucible_assets.suites.assets import SUITES
from bench.timing import timed

STARTUP = ("each `dagster job execute` pays Dagster's own per-run work: importing dagster, its CLI and its SQLite "
           "storage (about 2 s), loading every recipe's Definitions (0.5 s), creating the run and writing its ~120 "
           "events (planned materializations and checks, step starts, inputs, outputs, materializations, check "
           "evaluations) to the SQLite event log, each in its own transaction (about 2 s); a cache-hit re-run pays "
           "little else: it imports no torch, transformers, tinker, matplotlib or Great Expectations, the dataset "
           "checks report their verdict recorded for that data version, and each artifact is hashed once per process")
FIRST_RUN = ("the job validates the dataset with Great Expectations, whose import alone takes about 5 s here (the bare "
             "loop validates nothing), and every stage writes its artifact to the store, hashed and renamed; on top of "
             "that, ")
REPO = Path(__file__).resolve().parents[2]
# the tiny model of tests/conftest.py: for --quick, where only the harness is under test
TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def run_config(plan) -> dict:
    if plan.orchestration_steps is None:  # the job's own defaults
        return {}
    ops = {"sl_basic__checkpoint": {"config": {"max_steps": plan.orchestration_steps}}}
    if plan.orchestration_steps < 50:
        ops |= {"base__tiny_llama": {"config": TINY_MODEL}, "sl_basic__dataset": {"config": {"num_examples": 200}},
                "sl_basic__eval_report": {"config": {"max_tokens": 4, "bootstrap_samples": 50}}}
        ops |= {f"sl_basic__{suite.asset_stage}": {"config": {"num_prompts": 2, "bootstrap_samples": 50}}
                for suite in SUITES.values()}
    return {"ops": ops}


def _run(cmd: list[str], env: dict) -> float:
    def call():
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return timed(call)


def run(w, plan) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="bench_orch_"))
    config = run_config(plan)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    (root / "run.json").write_text(json.dumps(config))
    (root / "dagster").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CRUCIBLE_STORE"}  # the job's store is its own
    env |= {"DAGSTER_HOME": str(root / "dagster"), "CRUCIBLE_HOME": str(root / "crucible"),
            "DAGSTER_MODULE_NAME": "crucible_jobs"}
    dagster = str(Path(sys.executable).with_name("dagster"))
    job = [dagster, "job", "execute", "-j", "sl_basic", "-c", str(root / "run.yaml")]
    bare = _run([sys.executable, "-m", "bench.bare_sl_basic", str(root / "bare"), str(root / "run.json")], env)
    first = _run(job, env)
    rerun = _run(job, env)
    overhead = first - bare
    store = root / "crucible" / "store"
    assert (store / "objects").is_dir(), f"the job wrote no store at {store}"
    stored, copies = disk_bytes(store)[0], disk_bytes(store / "objects")[1]  # copies: every object's files, no pool
    details = {"bare seconds": bare, "dagster first run seconds": first, "dagster cache-hit re-run seconds": rerun,
               "training steps": plan.orchestration_steps or "sl_basic's default", "repetitions": "1 each, in order bare, job, re-run (not interleaved)",
               "store MB after the job (each large file once)": stored / 1e6, "store MB were every file a copy": copies / 1e6}
    return [
        Row("Orchestration overhead", "(dagster job - bare) seconds / 60 s", overhead / 60, 0.10, higher_is_better=False,
            details=details | {"overhead seconds": overhead, "overhead / this run": overhead / first},
            limit=FIRST_RUN + STARTUP),
        Row("Cache-hit re-run", "re-run seconds / first run seconds", rerun / first, 0.05, higher_is_better=False,
            details=details, limit=STARTUP),
    ]
