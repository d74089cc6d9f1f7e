"""Interleaved repetitions: ours and the references run back to back, alternating order
each repetition, so slow drifts of a shared machine hit every contestant alike. Medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(contestants: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each contestant runs one repetition per call and returns its rate."""
    samples: dict[str, list[float]] = {name: [] for name in contestants}
    for rep in range(reps):
        order = list(contestants) if rep % 2 == 0 else list(reversed(contestants))
        for name in order:
            samples[name].append(contestants[name]())
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def op_profile(contestant: Callable[..., float], top: int = 8) -> str:
    """Where one more repetition of ours spends its time, for a row that misses its target.
    `contestant(measure)` times its work with `measure` as it would with `timed`, so only that
    work is profiled, not its set-up (loading models). Reported: the aten operators with the
    most self CPU time (share of the work's wall time, calls), then what no operator accounts
    for (Python, the framework around the model, data handling). The profiler's own cost
    inflates small operators a little."""
    from torch.profiler import ProfilerActivity, profile

    found: list[str] = []

    def measure(fn: Callable[[], object]) -> float:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = timed(fn)
        ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0),
                     key=lambda e: -e.self_cpu_time_total)
        in_ops = sum(e.self_cpu_time_total for e in ops) / 1e6
        parts = [f"{e.key} {e.self_cpu_time_total / 1e6 / wall:.0%} ({e.count} calls)" for e in ops[:top]]
        found.append(f"one repetition of ours under torch.profiler, {wall:.2f} s: " + ", ".join(parts)
                     + f"; outside any aten operator {max(0.0, 1 - in_ops / wall):.0%}")
        return wall

    contestant(measure)
    return found[0]
