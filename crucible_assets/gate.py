"""What a trained model must show on its eval report to be registered: its primary metric's
paired gain over the starting model with a 95% CI on the good side of zero, and no guard
metric worse by more than its margin (non-inferiority), so a gain on one metric cannot hide
a regression on another. Stated once per recipe (`Recipe.gate`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Guard:
    """The 95% CI of this metric's paired gain may not reach past `margin` on the bad side."""
    metric: str
    margin: float
    higher_is_better: bool = True


@dataclass(frozen=True)
class Gate:
    """The primary metric also decides promotion against the champion (registry)."""
    metric: str
    higher_is_better: bool
    guards: tuple[Guard, ...] = ()

    def describe(self) -> str:
        side = "above" if self.higher_is_better else "below"
        guards = "".join(f"; {g.metric}_delta's CI no worse than {'-' if g.higher_is_better else '+'}{g.margin}"
                         for g in self.guards)
        return f"The 95% CI of {self.metric}_delta (trained - start) lies entirely {side} zero{guards}."

    def judge(self, report: dict) -> tuple[bool, list[str]]:
        """(passed, one line per metric judged) for an eval report."""
        lo, hi = _ci(report, self.metric)
        passed = lo > 0 if self.higher_is_better else hi < 0
        side = "above" if self.higher_is_better else "below"
        lines = [f"{self.metric}_delta {report[f'{self.metric}_delta']:.4g}, 95% CI [{lo:.4g}, {hi:.4g}]: "
                 + ("better than the starting model" if passed else f"not entirely {side} zero")]
        for guard in self.guards:
            glo, ghi = _ci(report, guard.metric)
            held = glo >= -guard.margin if guard.higher_is_better else ghi <= guard.margin
            bound = f"{'-' if guard.higher_is_better else '+'}{guard.margin}"
            lines.append(f"guard {guard.metric}_delta {report[f'{guard.metric}_delta']:.4g}, 95% CI [{glo:.4g}, {ghi:.4g}]: "
                         + (f"no worse than {bound}" if held else f"worse than {bound}: a regression"))
            passed = passed and held
        return passed, lines


def _ci(report: dict, metric: str) -> tuple[float, float]:
    if f"{metric}_delta_ci" not in report:
        raise KeyError(f"the gate needs {metric}_delta_ci, which this eval report does not have "
                       f"(it has: {sorted(k for k in report if k.endswith('_delta_ci'))})")
    return tuple(report[f"{metric}_delta_ci"])
