"""The supervised step: cross-entropy on weighted target tokens through the backend port,
normalized so the summed loss is the batch's mean NLL per target token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
from pydantic import Field

from crucible_assets.evaluation import nll_per_example
from crucible_assets.training import TrainConfig, layout_metrics, train
from resources.training_backend import Datum, TrainingClient

Example = tuple[list[int], list[float]]


class SupervisedTrainConfig(TrainConfig):
    nproc_per_node: int = Field(default=1, description="> 1: train data-parallel in this many processes started by "
                                                       "torchrun (one per GPU; CPU workers otherwise); 1 = in the Dagster step")
    dist_backend: str = Field(default="auto", description="torch.distributed backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.nproc_per_node < 1:
            found.append(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            found.append(f"dist_backend must be auto, gloo or nccl, got {self.dist_backend!r}")
        if self.nproc_per_node > self.batch_size:
            found.append(f"nproc_per_node ({self.nproc_per_node}) must not exceed batch_size ({self.batch_size})")
        return found


def read_pairs(tokenized_dir: Path, split: str) -> list[Example]:
    table = pq.read_table(tokenized_dir / f"{split}.parquet", columns=["tokens", "weights"])
    return [(r["tokens"], r["weights"]) for r in table.to_pylist()]


def mean_nll(client: TrainingClient, examples: list[Example]) -> float:
    nll, count = nll_per_example(client, examples)
    return float(nll.sum() / count.sum())


def train_supervised(
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
