"""What an eval suite is: a config, a `run` over a `SuiteRun` that returns a report (metrics in
the eval report's key scheme: `name`, `start/name`, `name_delta` with their `_ci`s, so the UI
and the markdown table show them as they show the eval report), and how its report reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dagster import Config
from pydantic import Field, PositiveInt

from crucible_assets.suites.prompts import Prompt
from resources.backends.types import TrainingClient


class SuiteConfig(Config):
    enabled: bool = Field(default=True, description="false: the suite writes a report that says it was turned off")
    num_prompts: PositiveInt = Field(default=64, description="held-out prompts asked (the first of the seeded test split)")
    bootstrap_samples: PositiveInt = 1000
    seed: int = 0


@dataclass
class SuiteRun:
    """The trained model and its start, the held-out prompts and how to render, stop and grade
    them; `members(specs)` loads registered models (an ensemble); `out` takes any plot."""
    trained: TrainingClient
    start: TrainingClient
    tokenizer: Any
    prompts: list[Prompt]
    renderer: str
    stop: list[str]
    grader: Callable[[str, str], tuple[bool, bool]]
    config: SuiteConfig
    out: Path
    members: Callable[[list[str]], dict[str, TrainingClient]] = field(default=lambda specs: {})
    judge: Callable[[], Any] = field(default=lambda: None)  # the `models` resource's client (a hosted model)


@dataclass(frozen=True)
class Suite:
    name: str
    config: type[SuiteConfig]
    run: Callable[[SuiteRun], dict]
    version: str  # the asset's code version: bump when the report's bytes change for the same inputs
    title: str
    note: str = ""  # how to read the table
    plots: tuple[str, ...] = ()  # PNGs `run` writes into out
    stage: str = ""  # the asset's stage name; empty: eval_<name>

    @property
    def asset_stage(self) -> str:
        return self.stage or f"eval_{self.name}"
