"""Helpers the rows share: our backend's client and TRL's common arguments."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from resources.hf_io import load_model
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.client import LocalTrainingClient



def trl_expert(**row_fields) -> dict:
    """TRL as an expert configures it on this machine, the headline reference of every row:
    the precision the same probe that decides ours measures faster (bf16 autocast or fp32),
    no gradient checkpointing (activations of a ~10M model fit many times over), plus what a
    row adds (padding-free SFT, precomputed DPO reference log-probs). TRL's defaults (bf16 and
    gradient checkpointing whatever the CPU) are each row's secondary line."""
    return {"bf16": LocalTorchBackend().resolved_precision() == "bf16", "gradient_checkpointing": False, **row_fields}


def spelled(fields: dict) -> str:
    """A reference's configuration as it appears in RESULTS.md."""
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def our_client(model_dir: Path) -> LocalTrainingClient:
    """The recipes' backend as they get it: precision auto (the probe's choice), packing on."""
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
