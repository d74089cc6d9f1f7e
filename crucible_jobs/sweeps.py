"""`crucible sweep run SPEC.yaml`: check the whole spec before anything trains (every point's
train config through the recipe's own typed config, the base run config through Dagster's
config check), save it, add its points as partitions, then run each point's partition of
`<recipe>_sweep` in this process (cached points cost a cache hit) and the sweep report; or,
with `--launch`, submit them as a backfill to the instance's run queue (the daemon, or a
cluster's executor from deploy/, runs them) and report later. `crucible sweep report` prints
the stored report; `crucible sweep register` registers a point through the recipe's gate."""

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from dagster import Config, DagsterInstance, DagsterInvalidConfigError, OpExecutionContext, job, op, validate_run_config
from pydantic import Field, ValidationError

from crucible_assets.caching import key
from crucible_assets.recipe import QUIET_CONSOLE
from crucible_assets.sweeps import spec as sweeps
from crucible_assets.sweeps.assets import points_partitions, report_ref_key
from recipes import RECIPES
from resources.store.artifact_store import ArtifactRef, ArtifactStore


def read_spec(path: str) -> sweeps.SweepSpec:
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source.resolve()}: no such sweep spec file")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    return sweeps.parse(raw, path)


def check(spec: sweeps.SweepSpec, source: str, module: str = "crucible_jobs", extra: dict | None = None) -> dict[str, dict]:
    """Every point, or ValueError naming the spec file and the field at fault. `module`: the
    code location the points run in; `extra`: run config every point gets on top (an executor's)."""
    by_name = {r.name: r for r in RECIPES}
    if spec.recipe not in by_name:
        raise ValueError(f"{source}: recipe: {spec.recipe!r} is not one of {sorted(by_name)}")
    train = by_name[spec.recipe].train
    in_base = f"base.ops.{sweeps.op(spec.recipe, 'checkpoint')}.config"
    for where, fields in (("axes", spec.axes), (in_base, sweeps.train_config(spec, {}))):
        if unknown := [f for f in fields if f not in train.model_fields]:
            raise ValueError(f"{source}: {where}.{unknown[0]}: not a field of {spec.recipe}'s train config ({train.__name__}); "
                             f"its fields: {', '.join(sorted(train.model_fields))}")
    try:
        points = sweeps.points(spec)
    except ValueError as e:
        raise ValueError(f"{source}: axes: {e}") from None
    if len(points) > spec.max_points:
        raise ValueError(f"{source}: {len(points)} points (configurations x seeds) is above max_points {spec.max_points}; "
                         "shrink the axes or raise max_points")
    for point, values in points.items():
        try:
            train(**sweeps.train_config(spec, values)).check(f"{source}: point {point}")
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(map(str, err["loc"]))
            where = f"axes.{field}" if field in values else f"{in_base}.{field}"
            raise ValueError(f"{source}: {where}: {err['msg']} (got {err.get('input')!r}, point {point})") from None
    try:
        validate_run_config(sweep_job(spec, module), point_config(spec, next(iter(points)), extra or {}))
    except DagsterInvalidConfigError as e:
        problems = "; ".join(err.message for err in e.errors)
        raise ValueError(f"{source}: base: not a valid run config for {spec.recipe}'s sweep: {problems}") from None
    return points


def instance() -> DagsterInstance:
    """The README's instance (DAGSTER_HOME), so the points show in the UI; a throwaway one without it."""
    try:
        return DagsterInstance.get()
    except Exception:  # DAGSTER_HOME unset: runs still execute, only their records are not kept
        return DagsterInstance.ephemeral()


def add_points(spec: sweeps.SweepSpec, points: dict[str, dict], dagster: DagsterInstance) -> None:
    sweeps.save(spec)
    name = points_partitions(spec.recipe).name
    known = set(dagster.get_dynamic_partitions(name))
    dagster.add_dynamic_partitions(name, [p for p in points if p not in known])


def sweep_job(spec: sweeps.SweepSpec, module: str):
    if os.getcwd() not in sys.path:  # as `dagster job execute -m` finds deploy.celery.definitions: from the working directory
        sys.path.append(os.getcwd())
    return importlib.import_module(module).defs.resolve_job_def(f"{spec.recipe}_sweep")


def laid_over(config: dict, extra: dict) -> dict:
    """`extra`'s top-level sections (`execution:` for a cluster's executor, `resources:`) laid
    over `config`'s, section by section."""
    return config | {section: {**config.get(section, {}), **value} for section, value in extra.items()}


def point_config(spec: sweeps.SweepSpec, point: str, extra: dict) -> dict:
    return laid_over(sweeps.run_config(spec, point), extra)


def dagster_cli() -> str:
    """The `dagster` beside this Python (the venv's), whether or not the venv is activated."""
    beside = Path(sys.executable).with_name("dagster")
    return str(beside) if beside.exists() else "dagster"


def run_points(spec: sweeps.SweepSpec, points: list[str], module: str, parallel: int, extra: dict,
               dagster: DagsterInstance) -> list[str]:
    """Each point as one Dagster run; the failed ones. In this process one after another, or,
    for another code location (deploy/celery, deploy/k8s: its executor spreads each run's steps
    over its workers) or `parallel > 1`, as `dagster job execute` processes, `parallel` at a time."""
    if module == "crucible_jobs" and parallel == 1 and not extra:
        job, failed = sweep_job(spec, module), []
        for i, point in enumerate(points, 1):
            print(f"[{i}/{len(points)}] {point}", flush=True)
            if not job.execute_in_process(partition_key=point, instance=dagster, raise_on_error=False).success:
                failed.append(point)
        return failed
    with tempfile.TemporaryDirectory() as configs, ThreadPoolExecutor(parallel) as pool:
        def one(point: str) -> bool:
            path = Path(configs) / f"{point}.yaml"
            path.write_text(yaml.safe_dump(point_config(spec, point, extra)))
            command = [dagster_cli(), "job", "execute", "-m", module, "-j", f"{spec.recipe}_sweep", "-c", str(path),
                       "--tags", json.dumps({"dagster/partition": point})]
            with open(Path(configs) / f"{point}.log", "w") as log:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode == 0
            print(f"{'done' if done else 'FAILED'}: {point}" + ("" if done else f"\n{(Path(configs) / f'{point}.log').read_text()[-3000:]}"),
                  flush=True)
            return done

        return [p for p, done in zip(points, pool.map(one, points)) if not done]


def run(path: str, launch: bool, module: str = "crucible_jobs", parallel: int = 1, extra_configs: tuple[str, ...] = ()) -> int:
    if launch and extra_configs:
        raise ValueError("--launch queues the points with the run config their partitions give them; an executor's "
                         "settings (-c) belong in the code location's executor there (e.g. celery_executor.configured)")
    spec = read_spec(path)
    extra: dict = {}
    for config in extra_configs:
        extra = laid_over(extra, yaml.safe_load(Path(config).read_text()) or {})
    points = check(spec, path, module, extra)
    dagster = instance()
    if launch:
        add_points(spec, points, dagster)
        return subprocess.call([dagster_cli(), "job", "backfill", "-m", module, "-j", f"{spec.recipe}_sweep",
                                "--partitions", ",".join(points), "--noprompt"])
    failed = execute(spec, points, dagster, module, parallel, extra, print)
    print_report(spec.name, as_json=False)
    return 1 if failed else 0


def execute(spec: sweeps.SweepSpec, points: dict[str, dict], dagster: DagsterInstance, module: str = "crucible_jobs",
            parallel: int = 1, extra: dict | None = None, log=print) -> list[str]:
    """Save the checked spec, add its points, run them, then the report; the failed points."""
    add_points(spec, points, dagster)
    log(f"sweep {spec.name}: {len(points)} points of {spec.recipe} ({len(points) // len(spec.seeds)} configurations x "
        f"{len(spec.seeds)} seeds)")
    started = time.monotonic()
    failed = run_points(spec, list(points), module, parallel, extra or {}, dagster)
    from crucible_jobs import defs

    report_key = key(spec.recipe, "sweep_report")
    defs.resolve_implicit_job_def_def_for_assets([report_key]).execute_in_process(
        instance=dagster, asset_selection=[report_key],
        run_config={"ops": {sweeps.op(spec.recipe, "sweep_report"): {"config": {"sweep": spec.name}}}})
    log(f"sweep {spec.name}: {len(points) - len(failed)} of {len(points)} points done in {time.monotonic() - started:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return failed


class SweepLaunch(Config):
    spec: str = Field(default="examples/sweep_sl_basic.yaml", description="a sweep spec YAML (docs/recipes.md#sweeps), "
                                                                          "relative to the code location's working directory")


@op(description="Check a sweep spec, add its points as partitions of <recipe>_sweep and run every point not cached "
                "(each its own run, listed under Runs), then <recipe>/sweep_report: `crucible sweep run` from the Launchpad.")
def run_sweep(context: OpExecutionContext, config: SweepLaunch) -> None:
    spec = read_spec(config.spec)
    if failed := execute(spec, check(spec, config.spec), context.instance, log=context.log.info):
        raise RuntimeError(f"sweep {spec.name}: points failed: {', '.join(failed)} (their runs say why)")
    context.log.info(f"report: {stored_report(spec.name).dir / 'report.md'}")


@job(name="sweep", description="Run a sweep from its spec file: the Launchpad's `crucible sweep run`.")
def sweep_launch_job():
    run_sweep()


def stored_report(name: str) -> ArtifactRef:
    try:
        return ArtifactStore().latest_verified(report_ref_key(sweeps.load(name).recipe, name))
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep {name} has no report yet: `crucible sweep run` it (or materialize its "
                                "<recipe>/sweep_report in the UI)") from None


def print_report(name: str, as_json: bool) -> int:
    ref = stored_report(name)
    print((ref.dir / ("report.json" if as_json else "report.md")).read_text(), end="")
    if not as_json:
        print(f"\n(report: {ref.dir / 'report.md'}, plot: {ref.dir / 'metric_by_axis.png'})")
    return 0


def register(name: str, point: str | None) -> int:
    """Register a point through the recipe's own job: its run config is the sweep's base with
    the point's train config, so checkpoint and eval report are the point's artifacts (cache
    hits) and only the gate, the promotion check and the export run. By default the best
    configuration at the sweep's first seed: choosing the luckiest seed would flatter it."""
    spec = sweeps.load(name)
    points = sweeps.points(spec)
    if point is None:
        best = json.loads((stored_report(name).dir / "report.json").read_text())["best"]
        point = sweeps.point_name(spec, {**best["values"], sweeps.SEED: spec.seeds[0]})
    if point not in points:
        raise KeyError(f"sweep {name} has no point {point!r}; its points: {', '.join(points)}")
    config = sweeps.recipe_config(spec, point)
    print(f"registering {point} through the {spec.recipe} job's gate")
    from crucible_jobs import defs

    result = defs.resolve_job_def(spec.recipe).execute_in_process(run_config={**QUIET_CONSOLE, **config}, instance=instance(),
                                                                   raise_on_error=False)
    return 0 if result.success else 1
