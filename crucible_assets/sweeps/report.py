"""What a sweep says: every point's eval metrics with their CIs; per configuration (the
points that differ only in seed) the mean, the seed-to-seed spread and a paired test of
trained vs start across seeds; the best configuration by the recipe's gate metric and
whether it beats the runner-up beyond seed noise, corrected for having picked it among many.

Why seeds are the unit of the tests: a point's bootstrap CI covers the eval set's sampling
noise only; whether configuration A beats B depends as much on which seed trained it, so the
comparison pairs A and B by seed (same seed, same data order) and tests the per-seed
differences with Student's t. Picking the best of m configurations and then testing it
against the others makes m - 1 comparisons: each is judged at 0.05 / (m - 1) (Bonferroni)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crucible_assets import plots
from crucible_assets.evaluation import compared_metrics, sig4_text
from crucible_assets.sweeps.spec import SEED, SweepSpec, configurations, point_name, points

ALPHA = 0.05


def t_test(values: list[float]) -> dict[str, Any] | None:
    """Mean of `values` with its 95% t-interval and the two-sided p-value of mean == 0; None
    below two values (no spread to test against)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    mean, sem = float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
    if sem == 0:
        return {"mean": mean, "ci": [mean, mean], "p": 0.0 if mean else 1.0, "n": len(x)}
    half = float(stats.t.ppf(1 - ALPHA / 2, len(x) - 1)) * sem
    p = float(2 * stats.t.sf(abs(mean) / sem, len(x) - 1))
    return {"mean": mean, "ci": [mean - half, mean + half], "p": p, "n": len(x)}


def label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def summarize(spec: SweepSpec, reports: dict[str, dict], metric: str, higher_is_better: bool) -> dict[str, Any]:
    """`reports`: each finished point's eval report by point name (missing points are listed,
    not guessed). Everything the report shows, as JSON."""
    rows, groups = [], []
    for config in configurations(spec):
        names = {seed: point_name(spec, {**config, SEED: seed}) for seed in spec.seeds}
        done = {seed: reports[n] for seed, n in names.items() if n in reports}
        for seed, r in done.items():
            rows.append({"point": names[seed], **config, SEED: seed,
                         **{k: r[k] for m in compared_metrics(r) for k in (m, f"{m}_ci", f"start/{m}", f"{m}_delta", f"{m}_delta_ci")
                            if k in r}})
        if done:
            values = [r[metric] for r in done.values()]
            groups.append({"configuration": label(config), "values": config, "seeds": sorted(done),
                           "mean": float(np.mean(values)), "seed_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                           "start": float(np.mean([r[f"start/{metric}"] for r in done.values()])),
                           "gain": t_test([r[f"{metric}_delta"] for r in done.values()]),
                           "by_seed": {s: r[metric] for s, r in done.items()},
                           "point_ci": next(iter(done.values()))[f"{metric}_ci"] if len(done) == 1 else None})
    sign = 1 if higher_is_better else -1
    groups.sort(key=lambda g: -sign * g["mean"])
    summary = {"sweep": spec.name, "recipe": spec.recipe, "metric": metric, "higher_is_better": higher_is_better,
               "axes": [a for a in spec.axes], "seeds": spec.seeds, "points": rows, "configurations": groups,
               "missing": sorted(set(points(spec)) - set(reports))}
    if groups:
        summary["best"] = best_against_rest(groups, sign)
    return summary


def best_against_rest(groups: list[dict], sign: int) -> dict[str, Any]:
    """The best configuration (groups sorted best first) against each other one, paired by
    seed, Bonferroni over the m - 1 comparisons; `significant_over_runner_up` is the headline."""
    best, others = groups[0], groups[1:]
    level = ALPHA / max(1, len(others))
    comparisons = []
    for other in others:
        shared = sorted(set(best["by_seed"]) & set(other["by_seed"]))
        test = t_test([sign * (best["by_seed"][s] - other["by_seed"][s]) for s in shared])
        comparisons.append({"against": other["configuration"], "seeds": shared, "advantage": test,
                            "significant": bool(test and test["mean"] > 0 and test["p"] < level)})
    runner_up = comparisons[0] if comparisons else None
    return {"configuration": best["configuration"], "values": best["values"], "mean": best["mean"],
            "correction": f"Bonferroni over {len(others)} comparison(s): each at p < {level:.3g}",
            "comparisons": comparisons,
            "significant_over_runner_up": None if runner_up is None or runner_up["advantage"] is None
            else runner_up["significant"]}


def fmt(x: float | None) -> str:
    return "n/a" if x is None else sig4_text(x)


def interval(ci) -> str:
    return "n/a" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def verdict(summary: dict) -> str:
    best = summary.get("best")
    if best is None:
        return "no point has finished yet"
    if best["significant_over_runner_up"] is None:
        why = "one configuration" if not best["comparisons"] else "fewer than two shared seeds"
        return f"best: {best['configuration']} (not tested against the runner-up: {why})"
    runner = best["comparisons"][0]
    adv = runner["advantage"]
    return (f"best: {best['configuration']}; its advantage over {runner['against']} is {fmt(adv['mean'])} "
            f"(95% CI {interval(adv['ci'])}, p = {fmt(adv['p'])}): "
            f"{'significant' if runner['significant'] else 'not significant'} ({best['correction']})")


def markdown(summary: dict) -> str:
    metric = summary["metric"]
    lines = [f"# Sweep {summary['sweep']} ({summary['recipe']}): {metric}, "
             f"{'higher' if summary['higher_is_better'] else 'lower'} is better", "", verdict(summary), "",
             "## Configurations (across seeds)", "",
             f"| configuration | seeds | mean {metric} | seed sd | start | gain (mean over seeds) | gain 95% t-CI | p (gain = 0) |",
             "|---|---|---|---|---|---|---|---|"]
    for g in summary["configurations"]:
        gain = g["gain"] or {}
        lines.append(f"| {g['configuration']} | {len(g['seeds'])} | {fmt(g['mean'])} | {fmt(g['seed_sd'])} | {fmt(g['start'])} "
                     f"| {fmt(gain.get('mean'))} | {interval(gain.get('ci'))} | {fmt(gain.get('p'))} |")
    metrics = sorted({k for row in summary["points"] for k in row if f"start/{k}" in row})
    lines += ["", "## Points", "", "| point | " + " | ".join(f"{m} [95% CI] (gain [CI])" for m in metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for row in summary["points"]:
        cells = [f"{fmt(row[m])} {interval(row.get(f'{m}_ci'))} ({fmt(row.get(f'{m}_delta'))} {interval(row.get(f'{m}_delta_ci'))})"
                 if m in row else "n/a" for m in metrics]
        lines.append(f"| {row['point']} | " + " | ".join(cells) + " |")
    if summary["missing"]:
        lines += ["", f"Not finished yet ({len(summary['missing'])}): " + ", ".join(summary["missing"])]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """The gate metric against each axis: a line per combination of the other axes, each
    point the mean over seeds with its 95% t-interval (one seed: the point's bootstrap CI)."""
    plt = plots.pyplot()
    axes = summary["axes"]
    fig, subplots = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.5), squeeze=False)
    for ax, axis in zip(subplots[0], axes):
        lines: dict[str, list[dict]] = {}
        for g in summary["configurations"]:
            lines.setdefault(label({k: v for k, v in g["values"].items() if k != axis}), []).append(g)
        for name, groups in lines.items():
            groups = sorted(groups, key=lambda g: g["values"][axis])
            xs = [g["values"][axis] for g in groups]
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            positions = xs if numeric else list(range(len(xs)))
            means = [g["mean"] for g in groups]
            cis = [mean_interval(g) for g in groups]
            err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
            ax.errorbar(positions, means, yerr=err, marker="o", capsize=4, label=name or "mean over seeds")
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 3:
                ax.set_xscale("log")
            ax.set_xticks(positions, [f"{x:g}" if numeric else str(x) for x in xs])
            ax.minorticks_off()
        if starts := [g["start"] for g in summary["configurations"]]:  # a line would squash the points together
            ax.set_title(f"starting model: {float(np.mean(starts)):.4g}", fontsize="small")
            ax.legend(fontsize="small")
        ax.set_xlabel(axis)
        ax.set_ylabel(summary["metric"])
    plots.save_figure(fig, path)


def mean_interval(group: dict) -> tuple[float, float]:
    values = list(group["by_seed"].values())
    if len(values) < 2:
        lo, hi = group["point_ci"]
        return lo, hi
    return tuple(t_test(values)["ci"])
