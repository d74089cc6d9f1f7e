"""The supervised step: cross-entropy on weighted target tokens through the backend port,
normalized so the summed loss is the batch's mean NLL per target token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from crucible_assets.evaluation import nll_per_example
from crucible_assets.training import TrainConfig, layout_metrics, train
from resources.training_backend import Datum, TrainingClient

Example = tuple[list[int], list[float]]


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
