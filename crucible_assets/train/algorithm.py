"""What an algorithm plugs into the shared assets: a training function over a `TrainingRun`,
an evaluation over an `EvalRun`, the data kind it reads, and the names of its curves. The
checkpoint factory (train/checkpoint.py) and the eval report (eval_report.py) do the rest:
config checks, clients, caching, saving, tracking, plots. Each algorithm's module ends with
its `ALGORITHM`; a recipe (recipes/) picks one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from crucible_assets.data import DataKind
from crucible_assets.evaluation import EvalConfig
from crucible_assets.train.loop import TrainConfig
from resources.backends.types import TrainingClient
from resources.store.artifact_store import ArtifactRef

@dataclass
class TrainingRun:
    """`client` is the model being trained (made from `inputs["base_model"]` before `train`
    runs); `backend` makes any other model the algorithm needs (a reference, a teacher)."""
    client: TrainingClient
    config: TrainConfig
    inputs: dict[str, ArtifactRef]
    backend: Any
    work: Path
    log: Callable[[str], None]


@dataclass
class EvalRun:
    """The trained model and its start on the held-out rows; `train_config` is the checkpoint's
    own resolved config, `models` the other model stages listed in `Algorithm.eval_models`;
    `ood_rows` the test_ood split (items outside the training distribution; empty where the
    dataset has none), which an algorithm may report apart: no gate reads it."""
    start: TrainingClient
    trained: TrainingClient
    rows: list[dict]
    config: EvalConfig
    train_config: TrainConfig
    stop: list[str]
    models: dict[str, TrainingClient]
    ood_rows: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Algorithm:
    name: str
    data_kind: DataKind
    train_config: type[TrainConfig]
    eval_config: type[EvalConfig]
    train: Callable[[TrainingRun], tuple[list[dict], dict]]
    evaluate: Callable[[EvalRun], dict]
    loss_key: str  # the training curve's metric, and the eval key plotted beside it
    eval_key: str
    report_metric: tuple[str, str]  # (metric, axis label) of the eval report's start-vs-trained plot
    checkpoint_description: str
    eval_description: str
    inputs: tuple[str, ...] = ()  # stages of the recipe the checkpoint reads besides tokenized and base_model
    held_out: str = "tokenized"  # the stage whose test split the eval report judges on (dpo: its on-policy pairs)
    eval_models: tuple[str, ...] = ()  # model stages the eval report loads besides start and trained
    model_stages: tuple[str, ...] = ()  # extra model snapshots (a teacher) the recipe must say where to start
    stages: tuple[Callable[[str], Any], ...] = ()  # factories of the algorithm's own assets, given the recipe name
    plot_training_curve: bool = False  # the eval report also shows the checkpoint's training curve
    data_parallel: bool = False  # config.nproc_per_node > 1 trains under torchrun (train/torchrun.py)
    checkpoint_version: str = "3"  # 3: the loss curve names its Y axis; bump when checkpoint bytes change for the same inputs
    eval_version: str = "1"  # bump when the eval report's bytes change for the same inputs
