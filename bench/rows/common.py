"""Helpers the rows share: our backend's client and TRL's common arguments."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from resources.hf_io import load_model
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.client import LocalTrainingClient

# TRL's defaults stay as they are (bf16 autocast, gradient checkpointing): the tuned line
# turns off exactly those two, the fairest fp32 setting for this CPU
TRL_TUNED = {"bf16": False, "gradient_checkpointing": False}


def our_client(model_dir: Path) -> LocalTrainingClient:
    """The recipes' backend as they get it: precision auto, packing on."""
    return LocalTorchBackend().create_training_client(model_dir, lora_rank=0, seed=0)


def hf_model(model_dir: Path):
    return load_model(model_dir, "cpu")


def trl_args(config_cls, plan, steps: int, **fields):
    """Settings shared by every TRL trainer here: same lr and steps as ours, no logging,
    no saving, CPU; everything else is TRL's default unless `fields` says otherwise."""
    return config_cls(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, report_to="none", save_strategy="no",
        max_steps=steps, learning_rate=plan.learning_rate, logging_steps=10**6, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", warmup_steps=0, **fields,
    )


def our_train_config(config_cls, plan, steps: int, **fields):
    """Our loop's config matching `trl_args`: constant lr, no mid-run eval or saves."""
    return config_cls(learning_rate=plan.learning_rate, lr_schedule="constant", warmup_steps=0, batch_size=plan.batch_size,
                      max_steps=steps, eval_every=10**6, save_every=10**6, **fields)


def train_quietly(trainer) -> None:
    """Trainer.train prints its final metrics dict; the bench prints only its table."""
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
