"""A row of the results table: what was measured, against what, and the target."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    name: str
    measure: str            # what the value means, e.g. "tokens/s ratio (ours / TRL SFTTrainer)"
    value: float
    target: float
    higher_is_better: bool = True
    details: dict[str, float | str] = field(default_factory=dict)  # medians and settings behind the value
    limit: str = ""         # what holds the row back when it misses its target
    profile: str = ""       # where ours spends its time (bench.timing.op_profile): the evidence for `limit`

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def target_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}"
