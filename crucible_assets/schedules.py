"""Learning-rate schedules as pure functions of the step, so a resumed run is exact."""

import math


def learning_rate(step: int, total_steps: int, peak: float, schedule: str, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Decays from `peak` to `min_ratio * peak`. A floor above zero matters when the model is
    trained further (RL, DPO): decaying to zero lets Adam settle where the loss is so sharp
    that any later step of a useful size overshoots."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = min_ratio * peak
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule {schedule!r} is not one of constant, linear, cosine")
