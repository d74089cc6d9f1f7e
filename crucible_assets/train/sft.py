"""Supervised fine-tuning: cross-entropy on the weighted target tokens through the backend
port, normalized so the summed loss is the batch's mean NLL per target token. Read top to
bottom: config, the step, training, evaluation, the algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, PositiveInt

from crucible_assets import evaluation
from crucible_assets.evaluation import EvalConfig, nll_per_example
from crucible_assets.train.algorithm import Algorithm, EvalRun, TrainingRun
from crucible_assets.train.loop import TrainConfig, layout_metrics, train
from resources.backends.types import Datum, TrainingClient

Example = tuple[list[int], list[float]]  # (token ids, loss weight per token)


class SftConfig(TrainConfig):
    nproc_per_node: PositiveInt = Field(default=1, description="> 1: train data-parallel in this many processes started by "
                                                              "torchrun (one per GPU; CPU workers otherwise); 1 = in the Dagster step")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(default="auto", description="torch.distributed backend: auto (nccl on GPU, gloo on CPU)")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.nproc_per_node > self.batch_size:
            found.append(f"nproc_per_node ({self.nproc_per_node}) must not exceed batch_size ({self.batch_size})")
        return found


def read_examples(tokenized_dir: Path, split: str) -> list[Example]:
    table = pq.read_table(tokenized_dir / f"{split}.parquet", columns=["tokens", "weights"])
    return [(r["tokens"], r["weights"]) for r in table.to_pylist()]


def mean_nll(client: TrainingClient, examples: list[Example]) -> float:
    nll, count = nll_per_example(client, examples)
    return float(nll.sum() / count.sum())


def train_sft(
    client: TrainingClient,
    train_examples: list[Example],
    test_examples: list[Example],
    cfg: TrainConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    def step(_step: int, indices: list[int]) -> dict:
        batch = [train_examples[i] for i in indices]
        total_weight = sum(sum(w[1:]) for _, w in batch)
        # weights / total make the summed cross-entropy the batch's mean NLL per target token
        data = [Datum.from_sequence(t, [x / total_weight for x in w]) for t, w in batch]
        fb = client.forward_backward(data, "cross_entropy")
        return {"train_mean_nll": fb.metrics["loss:sum"], "num_sequences": len(batch),
                "num_loss_tokens": int(total_weight), **layout_metrics(fb.metrics, [t for t, _ in batch])}

    return train(client, len(train_examples), cfg, work_dir, step,
                 lambda: {"test/nll": mean_nll(client, test_examples)}, "train_mean_nll", log)


def train_run(run: TrainingRun) -> tuple[list[dict], dict]:
    tokenized = run.inputs["tokenized"].dir
    return train_sft(run.client, read_examples(tokenized, "train"), read_examples(tokenized, "test"), run.config, run.work, run.log)


def evaluate_sft(run: EvalRun) -> dict:
    """NLL and bits per byte of the held-out targets, and greedy answer accuracy, both models."""
    target_bytes = np.array([r["target_bytes"] for r in run.rows], dtype=float)
    return evaluation.evaluate(run.start, run.trained, run.trained.tokenizer, run.rows, target_bytes, run.config, run.stop)


ALGORITHM = Algorithm(
    name="sft",
    data_kind="conversations",
    train_config=SftConfig,
    eval_config=EvalConfig,
    train=train_run,
    evaluate=evaluate_sft,
    loss_key="train_mean_nll",
    eval_key="test/nll",
    report_metric=("test/nll", "test/nll (nats/token)"),
    data_parallel=True,
    eval_version="4",  # 3: report.md columns start, trained, gain (CI); 4: a verdict column
    checkpoint_description="The fine-tuned model: supervised training (cross-entropy on the weighted target tokens) of the "
                           "starting model. Holds an HF model dir, the optimizer state to resume from, per-step "
                           "metrics.jsonl and the loss curve. nproc_per_node > 1 trains data-parallel under torchrun, "
                           "streamed back through Dagster Pipes.",
    eval_description="How much training helped, on held-out examples: NLL, bits per byte and answer "
                     "accuracy of the trained model vs. the starting model, with bootstrap CIs.",
)
