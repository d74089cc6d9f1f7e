"""The training loop every recipe shares: seeded batch order, learning-rate schedule,
optimizer step, periodic held-out eval, resumable saves, progress logs.

Everything that decides a step (batch order, learning rate) is a pure function of the step
number and the seed, and state is saved with the optimizer every `save_every` steps, so a
run killed at any point resumes from its last save and ends on the same bytes. A recipe
supplies only `step_fn` (forward/backward on a batch, returns its metrics) and `eval_fn`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
from dagster import Config
from pydantic import Field, NonNegativeInt, PositiveInt

from crucible_assets.train.progress import ProgressLog
from resources.backends.types import AdamParams, TrainingClient
from resources.store.jsonl import read_jsonl, to_jsonl


# Constrained types, so a subclass that changes a default keeps the rule: `batch_size: PositiveInt = 16`.
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1)]
LrSchedule = Literal["constant", "linear", "cosine"]


class TrainConfig(Config):
    learning_rate: PositiveFinite = Field(default=2e-3, description="peak learning rate")
    lr_schedule: LrSchedule = "cosine"
    warmup_steps: NonNegativeInt = 10
    min_lr_ratio: Fraction = Field(default=0.0, description="the schedule decays to min_lr_ratio * learning_rate")
    batch_size: PositiveInt = Field(default=32, description="examples (sequences or pairs) per optimizer step")
    num_epochs: PositiveInt = 1
    max_steps: NonNegativeInt = Field(default=0, description="> 0 overrides num_epochs")
    lora_rank: NonNegativeInt = Field(default=0, description="0 = full fine-tune; > 0 = LoRA of this rank (peft)")
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: PositiveInt = Field(default=50, description="steps between held-out evaluations")
    save_every: PositiveInt = Field(default=50, description="steps between resumable checkpoints")
    seed: int = 0

    def problems(self) -> list[str]:
        """Rules that span fields (one field's own range is its type's, checked when the run
        config is read); subclasses add theirs."""
        return []

    def check(self, where: str = "training") -> None:
        """`where` names the asset whose config this is, so the error points at the op to fix."""
        if found := self.problems():
            raise ValueError(f"{where} config: " + "; ".join(found))


def learning_rate(step: int, total_steps: int, peak: float, schedule: str, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """A pure function of the step, so a resumed run is exact. Decays from `peak` to
    `min_ratio * peak`. A floor above zero matters when the model is trained further (RL,
    DPO): decaying to zero lets Adam settle where the loss is so sharp that any later step
    of a useful size overshoots."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = min_ratio * peak
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule {schedule!r} is not one of constant, linear, cosine")


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """A fresh seeded permutation per epoch; the last batch of an epoch may be short."""
    per_epoch = -(-n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size : (i + 1) * batch_size].tolist()


def total_steps(cfg: TrainConfig, n: int) -> int:
    return cfg.max_steps or cfg.num_epochs * -(-n // cfg.batch_size)


def _last_save(work_dir: Path) -> Path | None:
    saves = sorted(work_dir.glob("step_*"))
    return saves[-1] if saves else None


def _writes(client: TrainingClient) -> bool:
    """Under data parallelism every rank runs this loop on identical state; rank 0 saves it."""
    return getattr(client, "rank", 0) == 0


def _save(client: TrainingClient, work_dir: Path, step: int, rows: list[dict]) -> None:
    tmp = work_dir / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        client.save_state(tmp)
        (tmp / "metrics.jsonl").write_text(to_jsonl(rows))
    except BaseException:  # a full disk: drop the half-written save, keep the last good one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, work_dir / f"step_{step:07d}")
    for old in sorted(work_dir.glob("step_*"))[:-1]:
        shutil.rmtree(old)


def interrupted(step: int, steps: int, work_dir: Path, save_every: int) -> str:
    """What a person who pressed Ctrl-C needs to know: what is kept, and what a re-run does."""
    last = _last_save(work_dir)
    if last is None:
        return (f"interrupted at step {step + 1}/{steps} before the first resumable save (every {save_every} steps); "
                "a re-run starts this training over")
    return (f"interrupted at step {step + 1}/{steps}; the save at step {int(last.name.split('_')[1])} is kept in {last}: "
            "re-run the same command to resume from it (to the same bytes as an uninterrupted run)")


def train(
    client: TrainingClient,
    num_examples: int,
    cfg: TrainConfig,
    work_dir: Path,
    step_fn: Callable[[int, list[int]], dict],
    eval_fn: Callable[[], dict],
    loss_key: str,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    """Returns per-step metrics (deterministic) and wall-clock telemetry (not). `step_fn`
    gets the step and the batch's example indices, runs forward/backward and returns metrics that must
    include `loss_key`, `num_tokens` and, when the backend reports them, `tokens:slots`."""
    steps = total_steps(cfg, num_examples)
    rows: list[dict] = []
    start = 0
    last = _last_save(work_dir)
    if last is not None:
        client.load_state(last, with_optimizer=True)
        rows = read_jsonl(last / "metrics.jsonl")
        start = int(last.name.split("_")[1])
        log(f"resuming from {last} at step {start}/{steps}")
    tokens_seen, slots, unpacked_slots, t0 = 0, 0, 0, time.perf_counter()
    progress = ProgressLog(steps, start, log)
    step = start
    try:
        for step in range(start, steps):
            metrics = step_fn(step, batch_indices(step, num_examples, cfg.batch_size, cfg.seed))
            lr = learning_rate(step, steps, cfg.learning_rate, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr_ratio)
            opt = client.optim_step(AdamParams(learning_rate=lr, beta1=cfg.beta1, beta2=cfg.beta2,
                                               weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm))
            tokens_seen += metrics["num_tokens"]
            slots += metrics.pop("tokens:slots", metrics["num_tokens"])
            unpacked_slots += metrics.pop("tokens:unpacked_slots", metrics["num_tokens"])
            row = {"step": step, **metrics, "learning_rate": lr, "grad_norm": opt["grad_norm"]}
            if not np.isfinite(row[loss_key]):
                raise FloatingPointError(f"step {step}: {loss_key} is {row[loss_key]}; last good state is in {work_dir}")
            done = step + 1
            if done % cfg.eval_every == 0 or done == steps:
                row.update(eval_fn())
            rows.append(row)
            if done % cfg.save_every == 0 and done < steps and _writes(client):
                _save(client, work_dir, done, rows)
            progress.step(done, metrics["num_tokens"], row, loss_key)
    except KeyboardInterrupt:
        log(interrupted(step, steps, work_dir, cfg.save_every))
        raise
    elapsed = time.perf_counter() - t0
    telemetry = {
        "train_seconds": elapsed,
        "tokens_per_second": tokens_seen / elapsed if elapsed > 0 else 0.0,
        "resumed_from_step": start,
        "steps_run": steps - start,
        # share of the model's input grid that was padding, as run and with one sequence per row
        "padding_fraction": 1 - tokens_seen / slots if slots else 0.0,
        "padding_fraction_unpacked": 1 - tokens_seen / unpacked_slots if unpacked_slots else 0.0,
    }
    return rows, telemetry


def layout_metrics(fb_metrics: dict, sequences: list[list[int]]) -> dict:
    """Tokens and padding of one step: what the backend ran, and one-sequence-per-row."""
    n_tokens = sum(len(t) - 1 for t in sequences)
    return {"num_tokens": n_tokens, "tokens:slots": fb_metrics.get("tokens:slots", n_tokens),
            "tokens:unpacked_slots": len(sequences) * max(len(t) - 1 for t in sequences)}
