"""A sweep through deploy/celery's code location for real: a local Redis broker (Debian's
`redis-server`; .ci/run installs it), two Celery workers started as deploy/celery/definitions.py
documents them, and `crucible sweep run --module deploy.celery.definitions -c
deploy/celery/celery.yaml --parallel 2`, which runs the points side by side with every step
queued to the workers. Both workers take steps, and every point's checkpoint and eval report
are the same bytes as the in-process sweep's (precision and threads pinned in the spec)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN_CONFIG, require_system_package, skip_or_fail_under_ci
from crucible_assets.sweeps import spec as sweeps
from crucible_jobs import cli
from local_services import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SPEC = {"name": "cel", "recipe": "sl_basic", "axes": {"learning_rate": [1e-3, 3e-3]}, "seeds": [0],
        "base": {"resources": {"backend": {"config": {"local": {"precision": "fp32", "threads": 1}}}},
                 "ops": {"base__tiny_llama": TINY_RUN_CONFIG["ops"]["base__tiny_llama"],
                         "sl_basic__checkpoint": {"config": {"max_steps": 10, "eval_every": 5, "save_every": 5}},
                         "sl_basic__eval_report": {"config": {"max_tokens": 8, "bootstrap_samples": 100}}}}}


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    require_system_package(bool(server), "redis-server", "redis-server")
    try:
        import dagster_celery  # noqa: F401
    except ImportError:
        skip_or_fail_under_ci("dagster-celery is not installed (the test extra installs it)")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=open(tmp_path / "redis.log", "w"), stderr=subprocess.STDOUT)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=30)


def start_worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    """One worker on both queues deploy/celery routes to (`dagster`, and `gpu` for training
    steps); dagster-celery hands each `-q` to celery as its own `-Q`, and celery keeps the last,
    so the queues go in one comma-separated argument."""
    return subprocess.Popen([str(VENV_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                             "-y", "deploy/celery/celery.yaml", "-q", "dagster,gpu", "-n", f"{name}@%h"],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def point_hashes(home: Path, spec: sweeps.SweepSpec) -> dict[str, str]:
    refs = home / "store" / "refs" / "sl_basic"
    return {f"{stage}/{p}": json.loads((refs / stage / f"{p}.json").read_text())["content_hash"]
            for p in sweeps.points(spec) for stage in ("sweep_checkpoint", "sweep_eval")}


@pytest.mark.slow
def test_sweep_fans_out_over_two_celery_workers_with_in_process_results(homes, tmp_path, redis_url, monkeypatch):
    from dagster import DagsterInstance

    crucible, dagster = homes
    (dagster / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    DagsterInstance.get().get_runs(limit=1)  # the SQLite schema exists before two workers open it at once
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    env = os.environ | {"CRUCIBLE_CELERY_BROKER": redis_url, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    workers = [start_worker(f"w{i}", env, log) for i, log in enumerate(logs, 1)]
    try:
        deadline = time.time() + 180  # start-up on busy cores, not a timing assertion
        while not all("ready." in log.read_text() for log in logs):
            assert time.time() < deadline and all(w.poll() is None for w in workers), logs[0].read_text()[-3000:]
            time.sleep(1)
        done = subprocess.run([str(VENV_BIN / "crucible"), "sweep", "run", str(path), "--module", "deploy.celery.definitions",
                               "-c", "deploy/celery/celery.yaml", "--parallel", "2"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        for w in workers:
            os.killpg(w.pid, 15)
            w.wait(timeout=60)
    for log in logs:  # each worker ran steps
        assert log.read_text().count("succeeded in") >= 2, log.read_text()[-3000:]
    spec = sweeps.parse(SPEC, "spec")
    on_workers = point_hashes(crucible, spec)

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "in_process"))
    assert cli.main(["sweep", "run", str(path)]) == 0
    assert point_hashes(tmp_path / "in_process", spec) == on_workers
