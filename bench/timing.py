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
