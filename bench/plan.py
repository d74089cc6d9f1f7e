"""How much each row runs: the default plan keeps the whole suite near ten minutes on two
busy cores; `--quick` is a smoke run that only proves the harness works."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    reps: int = 3
    batch_size: int = 8           # sequences (SFT), pairs (DPO) or completions (RL) per step
    # every contestant runs the same steps; fewer made fixed costs (trainer set-up, the first
    # optimizer step's state, kernel warm-up) a large share of a timed run, flattering whichever
    # side has the smaller ones: at 6 SFT and 3 DPO steps ours led TRL expert 1.18x and 1.14x, at
    # 24 and 8 (Intel Xeon, 2026-12-03) 1.06x and 0.98x. On a CPU that emulates bf16, TRL's
    # defaults line (~9 s per SFT step, ~20 s per DPO step) makes the whole run about 25 minutes
    sft_steps: int = 24
    dpo_steps: int = 8
    rl_steps: int = 4
    group_size: int = 4
    rl_max_tokens: int = 16
    sample_prompts: int = 16
    sample_max_tokens: int = 24
    tokenize_rows: int = 2000
    learning_rate: float = 1e-3
    orchestration_steps: int | None = None  # None: sl_basic's default job as the README runs it (600 steps)
    peak_seconds: float = 2.0


QUICK = Plan(reps=1, batch_size=4, sft_steps=2, dpo_steps=1, rl_steps=1, group_size=2, rl_max_tokens=4,
             sample_prompts=4, sample_max_tokens=4, tokenize_rows=50, orchestration_steps=2, peak_seconds=0.2)
