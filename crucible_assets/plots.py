"""PNG plots for artifacts and the Dagster UI; fixed metadata so the bytes are reproducible."""

from pathlib import Path

# Per-step series a checkpoint plots next to its loss curve, when its rows carry them
# (TRL / tinker-cookbook names): what the reward did and how far the policy moved.
EXTRA_CURVES = {
    "reward_curve": ("env/all/reward/total", "env/all/correct", "rewards/chosen", "rewards/rejected", "rewards/margins"),
    "kl_curve": ("optim/kl_sample_train_v1", "teacher_kl", "teacher_kl/forward"),
}


def pyplot():
    """matplotlib (about 1 s to import) loads with the first plot, so a cache hit never pays for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    pyplot().close(fig)


def loss_curve(rows: list[dict], path: Path, train_key: str, eval_key: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r[train_key] for r in rows], label=train_key)
    evals = [r for r in rows if eval_key in r]
    ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-", label=eval_key)
    ax.set_xlabel("step")
    ax.set_ylabel(train_key if train_key.split("/")[-1] == eval_key.split("/")[-1] else f"{train_key} / {eval_key}")
    ax.legend()
    save_figure(fig, path)


def extra_curves(rows: list[dict], out: Path) -> list[str]:
    """Writes each EXTRA_CURVES plot whose series the rows carry; returns the file names."""
    written = []
    for name, keys in EXTRA_CURVES.items():
        present = [k for k in keys if any(k in r for r in rows)]
        if not present:
            continue
        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        for k in present:
            points = [r for r in rows if k in r]
            ax.plot([r["step"] for r in points], [r[k] for r in points], label=k)
        ax.set_xlabel("step")
        ax.legend()
        save_figure(fig, out / f"{name}.png")
        written.append(f"{name}.png")
    return written


def comparison(labels: list[str], values: list[float], errors: list[tuple[float, float]], ylabel: str, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(4.5, 3.5))
    yerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.bar(labels, values, yerr=yerr, capsize=6, color=["#999999", "#3b7dd8"])
    ax.set_ylabel(ylabel)
    save_figure(fig, path)


def token_heatmap(rows: list[list[str]], scores: list[list[float]], captions: list[str], path: Path, per_line: int = 14) -> None:
    """Each row's tokens as boxes coloured by their score (red raises, blue lowers; each row
    scaled to its own largest magnitude), wrapped every `per_line` tokens, with a caption."""
    plt = pyplot()
    lines = [max(1, -(-len(tokens) // per_line)) for tokens in rows]
    fig, ax = plt.subplots(figsize=(11, 0.45 * (sum(lines) + 1.2 * len(rows)) + 0.4))
    cmap, y = plt.get_cmap("bwr"), 0.0
    for tokens, values, caption, n_lines in zip(rows, scores, captions, lines):
        scale = max(1e-12, max(abs(v) for v in values))
        ax.text(0, y, caption, fontsize=8, va="top", style="italic")
        y -= 0.7
        for i, (token, v) in enumerate(zip(tokens, values)):
            x = (i % per_line) / per_line
            if i and i % per_line == 0:
                y -= 0.6
            shown = token.replace("\n", "\\n") or " "
            ax.text(x, y, shown, fontsize=8, va="top", family="monospace",
                    bbox={"facecolor": cmap(0.5 + 0.5 * v / scale), "edgecolor": "none", "pad": 1.5})
        y -= 0.9
    ax.set_xlim(0, 1.05)
    ax.set_ylim(y, 0.3)
    ax.axis("off")
    save_figure(fig, path)
