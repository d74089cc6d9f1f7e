"""Progress lines for long training loops: a text bar, the step, the loss, throughput and
an ETA, at a steady wall-clock cadence whatever a step costs (a 40 ms SFT step and a
20 s RL step both report about every `every_s` seconds), plus the first and last step.
`dagster job execute` prints these lines, so the CLI shows the bar moving."""

from __future__ import annotations

import time
from typing import Callable

BAR_WIDTH = 20


def bar(done: int, total: int) -> str:
    filled = BAR_WIDTH * done // max(total, 1)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {100 * done // max(total, 1):3d}%"


class ProgressLog:
    def __init__(self, total: int, start: int, log: Callable[[str], None], every_s: float = 5.0, clock=time.monotonic):
        self.total, self.start, self.log, self.every_s, self.clock = total, start, log, every_s, clock
        self.t0 = self.last = clock()
        self.tokens = 0

    def step(self, done: int, tokens: int, metrics: dict[str, float], loss_key: str) -> None:
        """`done`: steps finished so far; `tokens`: tokens this step trained on."""
        self.tokens += tokens
        now = self.clock()
        if done - 1 != self.start and done != self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        eta = (self.total - done) * elapsed / (done - self.start)
        shown = [loss_key] + sorted(k for k in metrics if k.startswith("test/"))
        values = "".join(f" {k} {metrics[k]:.4f}" for k in shown if k in metrics)
        self.log(f"{bar(done, self.total)} step {done}/{self.total}{values} "
                 f"{self.tokens / elapsed:,.0f} tok/s eta {eta:.0f}s")
