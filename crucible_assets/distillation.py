"""Distillation from a teacher into a (smaller) student on the shared training loop.

Off-policy: cross-entropy on the teacher's own completions (sampled once, cached as an
asset with the teacher's log-probs). On-policy: the student samples, the teacher scores the
student's tokens, and the per-token reverse KL, log p_student - log p_teacher, enters the
importance-sampling loss as a negative advantage scaled by `kl_penalty_coef`; its gradient
is the gradient of the student's reverse KL to the teacher on the student's own states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from crucible_assets.evaluation import EvalConfig, bootstrap_ci, paired_report
from crucible_assets.math_grading import grade
from crucible_assets.rl import ENVS, greedy_accuracy, rl_datum
from crucible_assets.training import TrainConfig, layout_metrics, total_steps, train
from resources.training_backend import Datum, SampledSequence, SamplingParams, TrainingClient

MODES = ("off_policy", "on_policy", "off_then_on")


class DistillConfig(TrainConfig):
    mode: str = Field(default="off_then_on", description="off_policy | on_policy | off_then_on")
    off_policy_fraction: float = Field(default=0.5, description="off_then_on: share of steps trained off-policy first")
    batch_size: int = Field(default=32, description="prompts per step")
    group_size: int = Field(default=4, description="on-policy: student samples per prompt")
    kl_penalty_coef: float = Field(default=1.0, description="on-policy: advantage = -coef * (log p_student - log p_teacher)")
    env: str = Field(default="arithmetic", description="grader of the task metrics: arithmetic | gsm8k | math")
    max_tokens: int = 16
    temperature: float = Field(default=1.0, description="student sampling temperature (on-policy)")
    eval_problems: int = Field(default=64, description="held-out prompts for the in-loop accuracy and KL")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.mode not in MODES:
            found.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.off_policy_fraction <= 1:
            found.append(f"off_policy_fraction must be in [0, 1], got {self.off_policy_fraction}")
        if self.group_size < 1 or self.max_tokens < 1:
            found.append(f"group_size and max_tokens must be >= 1, got {self.group_size}, {self.max_tokens}")
        if not self.kl_penalty_coef > 0:
            found.append(f"kl_penalty_coef must be > 0, got {self.kl_penalty_coef}")
        if self.env not in ENVS:
            found.append(f"env must be one of {ENVS}, got {self.env!r}")
        if self.temperature <= 0:
            found.append(f"temperature must be > 0, got {self.temperature}")
        return found

    def on_policy_at(self, step: int, steps: int) -> bool:
        if self.mode != "off_then_on":
            return self.mode == "on_policy"
        return step >= round(self.off_policy_fraction * steps)


def reverse_kl_advantages(student_lp_T: np.ndarray, teacher_lp_T: np.ndarray, coef: float) -> np.ndarray:
    """Per sampled token: -coef * (log p_student - log p_teacher). The tokens are the
    student's own samples, so the mean of the difference estimates KL(student || teacher)."""
    return -coef * (student_lp_T - teacher_lp_T)


def sample_and_score(student: TrainingClient, teacher: TrainingClient, rows: list[dict], num_samples: int,
                     params: SamplingParams) -> list[tuple[int, list[int], SampledSequence, np.ndarray]]:
    """Student samples; the teacher scores each sampled token: (row index, prompt, sample,
    teacher_lp_T). Empty samples (an immediate stop) carry no tokens to train and are dropped."""
    prompts = [list(r["prompt_tokens"]) for r in rows]
    groups = student.sample(prompts, num_samples, params)
    samples = [(i, prompts[i], s) for i, group in enumerate(groups) for s in group if s.tokens]
    teacher_lps = teacher.compute_logprobs([p + s.tokens for _, p, s in samples])
    return [(i, p, s, np.array(lp[len(p) - 1:])) for (i, p, s), lp in zip(samples, teacher_lps)]


def per_prompt_kl(student: TrainingClient, teacher: TrainingClient, rows: list[dict], cfg: DistillConfig,
                  stop: list[str], seed: int = 0) -> np.ndarray:
    """Mean per-token KL(model || teacher) of each prompt, estimated on one sample at T=1."""
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, stop=stop, seed=seed)
    kl_N = np.zeros(len(rows))
    for i, _, s, t_lp in sample_and_score(student, teacher, rows, 1, params):
        kl_N[i] = float(np.mean(np.array(s.logprobs) - t_lp))
    return kl_N


def train_distill(
    student: TrainingClient,
    teacher: TrainingClient,
    tokenizer,
    teacher_samples: list[dict],
    train_rows: list[dict],
    test_rows: list[dict],
    cfg: DistillConfig,
    stop: list[str],
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    """`teacher_samples`: rows of `prompt_index` (into `train_rows`), `tokens`, `weights` (1 on
    the teacher's completion) and `teacher_logprobs` (length len(tokens) - 1), one or more
    per prompt. Batches are drawn over prompts; a prompt with k samples serves them in turn."""
    steps = total_steps(cfg, len(train_rows))
    by_prompt: dict[int, list[dict]] = {}
    for sample in teacher_samples:
        by_prompt.setdefault(sample["prompt_index"], []).append(sample)

    def off_policy_step(step_no: int, indices: list[int]) -> dict:
        batch = [by_prompt[i][step_no % len(by_prompt[i])] for i in indices if i in by_prompt]
        total_weight = sum(sum(r["weights"][1:]) for r in batch)
        data = [Datum.from_sequence(r["tokens"], [w / total_weight for w in r["weights"]]) for r in batch]
        fb = student.forward_backward(data, "cross_entropy")
        mask = [np.array(r["weights"][1:]) > 0 for r in batch]
        student_lp = np.concatenate([out["logprobs"].numpy()[m] for out, m in zip(fb.loss_fn_outputs, mask)])
        teacher_lp = np.concatenate([np.array(r["teacher_logprobs"])[m] for r, m in zip(batch, mask)])
        # on the teacher's samples, the mean of log p_teacher - log p_student estimates KL(teacher || student)
        return {"distill_loss": fb.metrics["loss:sum"], "teacher_kl/forward": float((teacher_lp - student_lp).mean()),
                **layout_metrics(fb.metrics, [r["tokens"] for r in batch])}

    def on_policy_step(step_no: int, indices: list[int]) -> dict:
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, stop=stop,
                                seed=cfg.seed * 1_000_003 + step_no)
        rows = [train_rows[i] for i in indices]
        scored = sample_and_score(student, teacher, rows, cfg.group_size, params)
        n_sampled = sum(len(s.tokens) for _, _, s, _ in scored)
        data = [rl_datum(p, s, reverse_kl_advantages(np.array(s.logprobs), t_lp, cfg.kl_penalty_coef), 1.0 / n_sampled)
                for _, p, s, t_lp in scored]
        fb = student.forward_backward(data, "importance_sampling")
        kl_T = np.concatenate([np.array(s.logprobs) - t_lp for _, _, s, t_lp in scored])
        correct = [grade(cfg.env, tokenizer.decode(s.tokens, skip_special_tokens=True), rows[i]["reference"])[0]
                   for i, _, s, _ in scored]
        return {"distill_loss": fb.metrics["loss:sum"], "teacher_kl": float(kl_T.mean()),
                "env/all/correct": float(np.mean(correct)), "env/all/ac_tokens_per_turn": n_sampled / len(scored),
                **layout_metrics(fb.metrics, [p + s.tokens for _, p, s, _ in scored])}

    def step(step_no: int, indices: list[int]) -> dict:
        on = cfg.on_policy_at(step_no, steps)
        return {"on_policy": int(on), **(on_policy_step(step_no, indices) if on else off_policy_step(step_no, indices))}

    eval_rows = test_rows[: cfg.eval_problems]

    def evaluate() -> dict:
        return {"test/accuracy": float(greedy_accuracy(student, tokenizer, eval_rows, cfg, stop).mean()),
                "test/teacher_kl": float(per_prompt_kl(student, teacher, eval_rows, cfg, stop).mean())}

    return train(student, len(train_rows), cfg, work_dir, step, evaluate, "distill_loss", log)


def evaluate_distill(start: TrainingClient, trained: TrainingClient, teacher: TrainingClient, tokenizer, rows: list[dict],
                     cfg: DistillConfig, eval_cfg: EvalConfig, kl_samples: int, stop: list[str]) -> dict:
    """Held-out prompts: greedy task accuracy of the student, the teacher and the starting
    student, and each student's mean per-token KL to the teacher (on `kl_samples` samples of
    its own per prompt), with paired bootstrap CIs of the student's gains over its start."""
    def kl(model: TrainingClient) -> np.ndarray:
        return np.mean([per_prompt_kl(model, teacher, rows, cfg, stop, seed=eval_cfg.seed + k) for k in range(kl_samples)], axis=0)

    teacher_acc = greedy_accuracy(teacher, tokenizer, rows, cfg, stop)
    report = paired_report({
        "test/accuracy": (greedy_accuracy(trained, tokenizer, rows, cfg, stop), greedy_accuracy(start, tokenizer, rows, cfg, stop)),
        "test/teacher_kl": (kl(trained), kl(start)),
    }, eval_cfg)
    teacher_ci = bootstrap_ci(lambda idx: teacher_acc[idx].mean(), len(rows), eval_cfg.bootstrap_samples, eval_cfg.seed)
    return {"num_problems": len(rows), **report, "teacher/test/accuracy": float(teacher_acc.mean()),
            "teacher/test/accuracy_ci": teacher_ci}
