"""A sweep: many runs of one recipe as one experiment. The spec (YAML, examples/sweep_*.yaml)
names the recipe, a base run config every point shares, axes over fields of the recipe's
train config and the seeds to repeat each configuration with. Each point becomes a dynamic
partition of the recipe's `sweep_checkpoint` and `sweep_eval`, named by its values
(`lr_seeds.learning_rate-0.001.seed-0`), so points read in the UI and a point with the same
values keeps its name (and its cached artifacts) when the sweep grows.

`crucible sweep run` saves the checked spec to `$CRUCIBLE_HOME/sweeps/<name>.json`; the
sweep job's partitioned run config reads it from there, so a point launched from the UI or a
backfill trains exactly what the CLI would."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from crucible_assets.suites.assets import SUITES, suite_stage
from resources.store.artifact_store import atomic_write_text
from resources.store.home import crucible_home

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # a store key segment without dots: dots separate a point's values
SEED = "seed"


class Range(BaseModel):
    """A random search's continuous axis: uniform in [min, max], or log-uniform with `log`."""
    model_config = ConfigDict(extra="forbid")
    min: float
    max: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min < self.max or (self.log and self.min <= 0):
            raise ValueError(f"needs min < max{' and min > 0 (log)' if self.log else ''}, got min={self.min}, max={self.max}")
        return self


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the sweep's name: letters, digits, _ and -; prefixes every point's name")
    recipe: str = Field(description="the recipe swept (sl_basic, chat_sl, dpo, math_rl, distillation, or your own)")
    base: dict[str, Any] = Field(default_factory=dict, description="a run config as `-c` takes it, shared by every point")
    axes: dict[str, list[Any] | Range] = Field(description="train config field -> values (grid or random) or a Range (random)")
    seeds: list[int] = Field(default=[0], min_length=1, description="each configuration is trained once per seed")
    search: Literal["grid", "random"] = "grid"
    samples: PositiveInt = Field(default=8, description="random search: configurations drawn (each run once per seed)")
    search_seed: int = Field(default=0, description="random search: the draw's seed")
    max_points: PositiveInt = Field(default=64, description="refuse a sweep of more points than this (configurations x seeds)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError(f"{v!r} must be letters, digits, _ and - (it names store paths and partitions)")
        return v

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict) -> dict:
        if not axes:
            raise ValueError("at least one axis (a train config field and its values)")
        for field, values in axes.items():
            if field == SEED:
                raise ValueError("seeds are swept with `seeds: [0, 1, 2]`, not as an axis")
            if isinstance(values, list) and not values:
                raise ValueError(f"axis {field!r} has no values")
            if isinstance(values, list) and len({json.dumps(v) for v in values}) < len(values):
                raise ValueError(f"axis {field!r} repeats a value: {values}")
        return axes

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"a seed is repeated: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _search(self):
        if self.search == "grid" and (ranges := [f for f, v in self.axes.items() if isinstance(v, Range)]):
            raise ValueError(f"a grid needs lists of values; axes {ranges} are ranges (use search: random)")
        return self


def configurations(spec: SweepSpec) -> list[dict[str, Any]]:
    """The axis values of each configuration (seeds apart): the grid's product, or `samples`
    draws from a seeded generator (lists uniformly, ranges uniform or log-uniform)."""
    fields = list(spec.axes)
    if spec.search == "grid":
        return [dict(zip(fields, values)) for values in itertools.product(*spec.axes.values())]
    rng = np.random.default_rng(spec.search_seed)

    def draw(values):
        if isinstance(values, Range):
            lo, hi = (math.log(values.min), math.log(values.max)) if values.log else (values.min, values.max)
            x = float(rng.uniform(lo, hi))
            return float(f"{math.exp(x) if values.log else x:.4g}")  # readable point names
        return values[int(rng.integers(len(values)))]

    drawn = [{f: draw(spec.axes[f]) for f in fields} for _ in range(spec.samples)]
    return list({json.dumps(c, sort_keys=True): c for c in drawn}.values())  # a repeated draw is one configuration


def value_text(value: Any) -> str:
    """A value as it reads in a point's name: 0.001, 1e-05, 1e06, true, cosine."""
    text = f"{value:g}".replace("e+", "e") if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or ".." in text:
        raise ValueError(f"value {value!r} cannot name a point (letters, digits, _ . -)")
    return text


def point_name(spec: SweepSpec, values: dict[str, Any]) -> str:
    return ".".join([spec.name, *(f"{field}-{value_text(v)}" for field, v in values.items())])


def points(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Every point's name -> its axis values and seed, configurations in order, seeds inner."""
    return {point_name(spec, values := {**config, SEED: seed}): values
            for config in configurations(spec) for seed in spec.seeds}


def op(recipe: str, stage: str) -> str:
    return f"{recipe}__{stage}"


def train_config(spec: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    """A point's train config: the base run config's `<recipe>__checkpoint` config, then its values."""
    base = spec.base.get("ops", {}).get(op(spec.recipe, "checkpoint"), {}).get("config", {})
    return {**base, **values}


def recipe_config(spec: SweepSpec, point: str) -> dict[str, Any]:
    """The recipe's own run config at one point: the base with the point's train config (what
    `crucible sweep register` runs the recipe's job with)."""
    config = copy.deepcopy(spec.base)
    ops = config.setdefault("ops", {})
    ops[op(spec.recipe, "checkpoint")] = {**ops.get(op(spec.recipe, "checkpoint"), {}),
                                          "config": train_config(spec, points(spec)[point])}
    return config


def run_config(spec: SweepSpec, point: str) -> dict[str, Any]:
    """The sweep job's run config for one point: the recipe's, with its checkpoint and eval
    settings moved onto `sweep_checkpoint` and `sweep_eval`; settings for the recipe's
    registration stages do not apply to a point."""
    config = recipe_config(spec, point)
    ops = config["ops"]
    for stage, swept in (("checkpoint", "sweep_checkpoint"), ("eval_report", "sweep_eval")):
        if (settings := ops.pop(op(spec.recipe, stage), None)) is not None:
            ops[op(spec.recipe, swept)] = settings
    for stage in ("champion_eval", "registered_model", *map(suite_stage, SUITES)):
        ops.pop(op(spec.recipe, stage), None)
    return config


def sweeps_dir() -> Path:
    return crucible_home() / "sweeps"


def save(spec: SweepSpec) -> Path:
    """Written atomically; a grown sweep (a fourth seed) rewrites it and keeps its points' names."""
    path = sweeps_dir() / f"{spec.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, spec.model_dump_json(indent=1))
    return path


def load(name: str) -> SweepSpec:
    path = sweeps_dir() / f"{name}.json"
    if not NAME.fullmatch(name) or not path.is_file():
        known = sorted(p.stem for p in sweeps_dir().glob("*.json")) if sweeps_dir().is_dir() else []
        raise KeyError(f"no sweep named {name!r} in {sweeps_dir()} (known: {', '.join(known) or 'none'}); "
                       "run `crucible sweep run SPEC.yaml` first")
    return SweepSpec.model_validate_json(path.read_text())


def sweep_of(point: str) -> SweepSpec:
    return load(point.split(".", 1)[0])


def parse(raw: Any, source: str) -> SweepSpec:
    """The spec, or ValueError naming the file and each bad field."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{source}: {problems}") from None
