"""PNG plots for artifacts and the Dagster UI; fixed metadata so the bytes are reproducible."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["train_mean_nll"] for r in rows], label="train_mean_nll")
    evals = [r for r in rows if "test/nll" in r]
    ax.plot([r["step"] for r in evals], [r["test/nll"] for r in evals], "o-", label="test/nll")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def comparison(labels: list[str], values: list[float], errors: list[tuple[float, float]], ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    yerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.bar(labels, values, yerr=yerr, capsize=6, color=["#999999", "#3b7dd8"])
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
