"""Eval report: the trained model against its starting point on held-out data, with
paired bootstrap confidence intervals, so "better" means the interval excludes zero."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from dagster import Config
from pydantic import Field, NonNegativeInt, PositiveInt

from resources.backends.types import SamplingParams, TrainingClient
from resources.datasets.graders import grade_conversation

Grader = Callable[[str, str], tuple[bool, bool]]  # (completion, reference) -> (correct, formatted)
Statistic = Callable[[np.ndarray], float]  # a metric of the examples at these indices


class EvalConfig(Config):
    max_tokens: PositiveInt = Field(default=24, description="generation budget per held-out prompt")
    num_shown: NonNegativeInt = Field(default=8, description="sampled completions included in the report")
    bootstrap_samples: PositiveInt = 1000
    seed: int = 0


def nll_per_example(client: TrainingClient, examples: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and weighted token count of each (tokens, weights) example's targets."""
    logprobs = client.compute_logprobs([tokens for tokens, _ in examples])
    nll = np.array([-np.dot(lp, weights[1:]) for lp, (_, weights) in zip(logprobs, examples)])
    count = np.array([sum(weights[1:]) for _, weights in examples])
    return nll, count


def bootstrap_ci(stat, n: int, samples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of `stat(indices)` over resampled example sets."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(samples)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def statistic_report(name: str, trained: Statistic, start: Statistic, gain: Statistic, n: int, cfg: EvalConfig) -> dict:
    """A metric for both models and their paired gain, each a statistic of the example
    indices, with a 95% bootstrap CI over the same resampled examples."""
    ci = lambda stat: bootstrap_ci(stat, n, cfg.bootstrap_samples, cfg.seed)  # noqa: E731
    everything = np.arange(n)
    return {name: float(trained(everything)), f"{name}_ci": ci(trained),
            f"start/{name}": float(start(everything)), f"start/{name}_ci": ci(start),
            f"{name}_delta": float(gain(everything)), f"{name}_delta_ci": ci(gain)}


def paired_report(per_example: dict[str, tuple[np.ndarray, np.ndarray]], cfg: EvalConfig) -> dict:
    """For each metric's per-example values (trained, start): both means and the mean gain."""
    def mean(values):
        return lambda idx: values[idx].mean()

    return {k: v for name, (trained_i, start_i) in per_example.items()
            for k, v in statistic_report(name, mean(trained_i), mean(start_i), mean(trained_i - start_i),
                                         len(trained_i), cfg).items()}


def greedy_answers(client: TrainingClient, tokenizer, rows: list[dict], max_tokens: int, stop: list[str], seed: int) -> list[str]:
    """Each row's prompt answered at temperature 0, decoded; `stop` (the renderer's end-of-turn
    sequences) ends an answer as a chat would."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed, stop=stop)
    outs = client.sample([list(r["prompt_tokens"]) for r in rows], 1, params)
    return [tokenizer.decode(o[0].tokens, skip_special_tokens=True) for o in outs]


def greedy_accuracy(client: TrainingClient, tokenizer, rows: list[dict], grader: Grader, max_tokens: int, stop: list[str],
                    seed: int) -> np.ndarray:
    """1.0 where the greedy answer is graded correct against the row's reference."""
    answers = greedy_answers(client, tokenizer, rows, max_tokens, stop, seed)
    return np.array([grader(a, r["reference"])[0] for a, r in zip(answers, rows)], dtype=float)


def ratio_report(name: str, trained_i: np.ndarray, start_i: np.ndarray, per_i: np.ndarray, cfg: EvalConfig) -> dict:
    """A metric that is a ratio of sums over examples (NLL per token, bits per byte)."""
    def ratio(values):
        return lambda idx: values[idx].sum() / per_i[idx].sum()

    gain = lambda idx: ratio(trained_i)(idx) - ratio(start_i)(idx)  # noqa: E731
    return statistic_report(name, ratio(trained_i), ratio(start_i), gain, len(per_i), cfg)


def evaluate(start: TrainingClient, trained: TrainingClient, tokenizer, rows: list[dict], test_bytes: np.ndarray, cfg: EvalConfig,
             stop: list[str]) -> dict:
    """`stop`: the renderer's end-of-turn sequences; sampling ends there as a chat would."""
    examples = [(r["tokens"], r["weights"]) for r in rows]
    nll_s, count = nll_per_example(start, examples)
    nll_t, _ = nll_per_example(trained, examples)
    report = {
        "num_examples": len(rows),
        "num_target_tokens": int(count.sum()),
        **ratio_report("test/nll", nll_t, nll_s, count, cfg),  # nats per target token
        **ratio_report("test/bits_per_byte", nll_t / math.log(2), nll_s / math.log(2), test_bytes, cfg),
    }
    return report | sampled_accuracy(start, trained, tokenizer, rows, cfg, stop)


def sampled_accuracy(start: TrainingClient, trained: TrainingClient, tokenizer, rows: list[dict], cfg: EvalConfig,
                     stop: list[str]) -> dict:
    """Greedy answers to the held-out prompts, graded against the reference, for both
    models; the paired CI of the gain says whether training helped."""
    prompted = [r for r in rows if len(r["prompt_tokens"])]
    if not prompted:
        return {}
    correct = {}
    for name, client in (("start/", start), ("", trained)):
        outs = greedy_answers(client, tokenizer, prompted, cfg.max_tokens, stop, cfg.seed)
        correct[name] = np.array([grade_conversation(o, r["reference"])[0] for o, r in zip(outs, prompted)], dtype=float)
    report = paired_report({"test/accuracy": (correct[""], correct["start/"])}, cfg)
    report["samples"] = [{"prompt": tokenizer.decode(r["prompt_tokens"]), "reference": r["reference"], "completion": o}
                         for r, o in list(zip(prompted, outs))[: cfg.num_shown]]
    return report


NA = "n/a"  # shown where the report has no such statistic (a metric reported without a CI or a paired gain)


def sig4(x: float) -> float:
    """`x` rounded to 4 significant digits, still a float: for display only, never for what is written."""
    return float(f"{x:.4g}")


def sig4_text(x: float) -> str:
    """`x` at 4 significant digits, positional (no exponent), trailing zeros dropped: 1.5, 0.0001235, 12350."""
    return np.format_float_positional(sig4(x), precision=4, unique=False, fractional=False, trim="-")


def compared_metrics(report: dict) -> list[str]:
    """The metrics reported for both the trained and the starting model."""
    return sorted(k for k in report if f"start/{k}" in report and not k.endswith("_ci"))


COMPARISON_COLUMNS = ("metric", "start", "trained", "trained_ci", "gain", "gain_ci", "verdict")
LOWER_IS_BETTER = ("nll", "bits_per_byte", "teacher_kl", "dpo_loss", "drop")  # a metric's last name part; every other: higher


def verdict(metric: str, gain_ci: tuple[float, float] | None) -> str:
    """"better" or "worse" when the paired gain's CI excludes zero, so no regression hides in
    a table of gains; "no clear change" when it includes zero."""
    if gain_ci is None:
        return NA
    lo, hi = gain_ci
    if lo <= 0 <= hi:
        return "no clear change"
    return "better" if (hi < 0) == (metric.split("/")[-1] in LOWER_IS_BETTER) else "worse"


def comparison_rows(report: dict) -> list[dict]:
    """One row per compared metric, in COMPARISON_COLUMNS order: the starting model's value,
    the trained value and its 95% CI, the paired gain (trained - start) with its 95% CI, and
    the verdict that CI gives. Numbers at 4 significant digits, CIs as short strings; "n/a"
    where the report has no such statistic (nothing is computed here)."""
    def ci(name):
        return f"[{sig4_text(report[name][0])}, {sig4_text(report[name][1])}]" if name in report else NA

    def number(name):
        return sig4(report[name]) if name in report else NA

    return [{"metric": k, "start": number(f"start/{k}"), "trained": number(k), "trained_ci": ci(f"{k}_ci"),
             "gain": number(f"{k}_delta"), "gain_ci": ci(f"{k}_delta_ci"), "verdict": verdict(k, report.get(f"{k}_delta_ci"))}
            for k in compared_metrics(report)]


OOD_PREFIX = "test_ood/"  # metrics on the test_ood split: items outside the training distribution


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| metric | start | trained | 95% CI (trained) | gain | 95% CI (gain) | verdict |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [sig4_text(v) if isinstance(v, float) else v for v in (row[c] for c in COMPARISON_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The comparison table (the same rows, columns and rounding as the UI's eval_table), the
    test_ood metrics in a table of their own (reported apart: no gate reads them), then
    sample completions."""
    rows = comparison_rows(report)
    lines = table_lines([r for r in rows if not r["metric"].startswith(OOD_PREFIX)])
    if ood := [r for r in rows if r["metric"].startswith(OOD_PREFIX)]:
        lines += ["", "Out of distribution (test_ood: items outside the training distribution, reported apart; "
                      "no gate reads them):", "", *table_lines(ood)]
    lines += ["", "gain: trained - start, paired over the same held-out examples; verdict: better or worse where the "
                  f"gain's CI excludes zero; {NA}: not reported for that metric.", ""]
    for s in report.get("samples", []):
        lines.append(f"- prompt `{s['prompt']!r}` reference `{s['reference']}` completion `{s['completion']}`")
    return "\n".join(lines) + "\n"
