"""PNG plots for artifacts and the Dagster UI; fixed metadata so the bytes are reproducible."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(rows: list[dict], path: Path, train_key: str, eval_key: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r[train_key] for r in rows], label=train_key)
    evals = [r for r in rows if eval_key in r]
    ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-", label=eval_key)
    ax.set_xlabel("step")
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
