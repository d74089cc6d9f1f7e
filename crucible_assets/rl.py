"""RL with verifiable rewards: sample a group of answers per problem, grade them, center the
rewards within each group, and train on the sampled tokens with the importance-sampling
(or PPO) loss, on the shared training loop. Metric names follow tinker-cookbook.

Masks cover sampled tokens only: the prompt carries weight, advantage and sampler
log-prob 0, and padding never reaches the loss (the backend masks it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from crucible_assets.evaluation import EvalConfig, paired_report
from crucible_assets.math_grading import grade
from crucible_assets.training import TrainConfig, layout_metrics, train
from resources.training_backend import Datum, SampledSequence, SamplingParams, TrainingClient

ENVS = ("arithmetic", "gsm8k", "math")
RL_LOSSES = ("importance_sampling", "ppo")


class RlConfig(TrainConfig):
    batch_size: int = Field(default=16, description="groups_per_batch: problems per step, each sampled group_size times")
    env: str = Field(default="arithmetic", description="grader: arithmetic | gsm8k | math")
    group_size: int = Field(default=8, description="samples per problem; advantages are centered within the group")
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    loss_fn: str = Field(default="importance_sampling", description="importance_sampling | ppo")
    clip_low_threshold: float = Field(default=0.8, description="ppo: lower bound of the probability ratio")
    clip_high_threshold: float = Field(default=1.2, description="ppo: upper bound of the probability ratio")
    advantage_std_normalize: bool = Field(default=False, description="divide each group's centered rewards by its std")
    remove_constant_reward_groups: bool = Field(default=False, description="drop groups whose samples all got the same reward")
    format_coef: float = Field(default=0.1, description="reward = correct + format_coef * (formatted - 1)")
    kl_penalty_coef: float = Field(default=0.0, description="> 0 penalizes per-token KL to kl_reference")
    kl_reference: str = Field(default="", description="'' (none) or 'base_model': the frozen starting model")
    eval_problems: int = Field(default=64, description="held-out problems for the in-loop greedy accuracy")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.env not in ENVS:
            found.append(f"env must be one of {ENVS}, got {self.env!r}")
        if self.loss_fn not in RL_LOSSES:
            found.append(f"loss_fn must be one of {RL_LOSSES}, got {self.loss_fn!r}")
        if self.group_size < 2:
            found.append(f"group_size must be >= 2 for grouped advantages, got {self.group_size}")
        if self.max_tokens < 1:
            found.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            found.append(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.kl_penalty_coef < 0:
            found.append(f"kl_penalty_coef must be >= 0, got {self.kl_penalty_coef}")
        if self.kl_penalty_coef > 0 and self.kl_reference != "base_model":
            found.append("kl_penalty_coef > 0 needs a reference model: set kl_reference: base_model")
        return found


def group_advantages(rewards_G: np.ndarray, std_normalize: bool) -> np.ndarray:
    centered_G = rewards_G - rewards_G.mean()
    if std_normalize:
        centered_G = centered_G / (rewards_G.std() + 1e-8)
    return centered_G


def rl_datum(prompt: list[int], sample: SampledSequence, token_advantages: np.ndarray, scale: float) -> Datum:
    """prompt + sampled tokens; per-token inputs are zero on the prompt."""
    n_p, n_s = len(prompt), len(sample.tokens)
    return Datum.from_sequence(
        prompt + sample.tokens,
        [0.0] * n_p + [1.0] * n_s,
        logprobs=[0.0] * n_p + list(sample.logprobs),
        advantages=[0.0] * n_p + list(token_advantages * scale),
    )


def train_rl(
    client: TrainingClient,
    reference: TrainingClient | None,
    tokenizer,
    train_rows: list[dict],
    test_rows: list[dict],
    cfg: RlConfig,
    stop: list[str],
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    seconds = {"time/sample": 0.0, "time/train": 0.0}  # wall clock: telemetry, never in metrics.jsonl

    def step(step_no: int, indices: list[int]) -> dict:
        problems = [train_rows[i] for i in indices]
        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
                                seed=cfg.seed * 1_000_003 + step_no)
        groups = client.sample([list(p["prompt_tokens"]) for p in problems], cfg.group_size, params)
        seconds["time/sample"] += time.perf_counter() - t0
        correct_N, formatted_N, rewards_N, kept = [], [], [], []
        for problem, group in zip(problems, groups):
            graded = [grade(cfg.env, tokenizer.decode(s.tokens, skip_special_tokens=True), problem["reference"]) for s in group]
            correct_G = np.array([c for c, _ in graded], dtype=float)
            formatted_G = np.array([f for _, f in graded], dtype=float)
            rewards_G = correct_G + cfg.format_coef * (formatted_G - 1)
            correct_N.append(correct_G), formatted_N.append(formatted_G), rewards_N.append(rewards_G)
            if not (cfg.remove_constant_reward_groups and np.ptp(rewards_G) == 0):
                kept.append((problem, group, group_advantages(rewards_G, cfg.advantage_std_normalize)))
        samples = [(p["prompt_tokens"], s, a) for p, group, adv_G in kept for s, a in zip(group, adv_G)]
        token_adv = [np.full(len(s.tokens), a) for _, s, a in samples]
        if cfg.kl_penalty_coef > 0 and samples:
            ref_lps = reference.compute_logprobs([list(p) + s.tokens for p, s, _ in samples])
            for i, ((p, s, _), ref_lp) in enumerate(zip(samples, ref_lps)):
                token_adv[i] = token_adv[i] - cfg.kl_penalty_coef * (np.array(s.logprobs) - np.array(ref_lp[len(p) - 1:]))
        n_sampled = sum(len(s.tokens) for _, s, _ in samples)
        data = [rl_datum(list(p), s, adv, 1.0 / max(n_sampled, 1)) for (p, s, _), adv in zip(samples, token_adv)]
        metrics = {}
        t1 = time.perf_counter()
        if data:
            fb = client.forward_backward(data, cfg.loss_fn, {"clip_low_threshold": cfg.clip_low_threshold,
                                                             "clip_high_threshold": cfg.clip_high_threshold})
            train_lp = np.concatenate([out["logprobs"][len(p) - 1:].numpy() for (p, _, _), out in zip(samples, fb.loss_fn_outputs)])
            sampler_lp = np.concatenate([np.array(s.logprobs) for _, s, _ in samples])
            metrics |= {"optim/kl_sample_train_v1": float((sampler_lp - train_lp).mean()),
                        "optim/entropy": float(-sampler_lp.mean()), "loss:sum": fb.metrics["loss:sum"],
                        **layout_metrics(fb.metrics, [list(p) + s.tokens for p, s, _ in samples])}
            if "clip_fraction" in fb.metrics:
                metrics["optim/clip_fraction"] = fb.metrics["clip_fraction"]
        else:
            metrics |= {"loss:sum": 0.0, "num_tokens": 0}
        all_good = [float(r.min() == r.max() and c.all()) for r, c in zip(rewards_N, correct_N)]
        all_bad = [float(r.min() == r.max() and not c.any()) for r, c in zip(rewards_N, correct_N)]
        row = {
            "env/all/reward/total": float(np.concatenate(rewards_N).mean()),
            "env/all/correct": float(np.concatenate(correct_N).mean()),
            "env/all/format": float(np.concatenate(formatted_N).mean()),
            "env/all/by_group/frac_mixed": float(np.mean([np.ptp(r) > 0 for r in rewards_N])),
            "env/all/by_group/frac_all_good": float(np.mean(all_good)),
            "env/all/by_group/frac_all_bad": float(np.mean(all_bad)),
            "env/all/ac_tokens_per_turn": float(np.mean([len(s.tokens) for group in groups for s in group])),
            "num_groups": len(problems),
            "num_groups_trained": len(kept),
            **metrics,
        }
        seconds["time/train"] += time.perf_counter() - t1
        return row

    eval_rows = test_rows[: cfg.eval_problems]

    def evaluate() -> dict:
        return {"test/accuracy": float(greedy_accuracy(client, tokenizer, eval_rows, cfg, stop).mean())}

    rows, telemetry = train(client, len(train_rows), cfg, work_dir, step, evaluate, "env/all/reward/total", log)
    return rows, telemetry | seconds



def greedy_accuracy(client: TrainingClient, tokenizer, rows: list[dict], cfg: RlConfig, stop: list[str]) -> np.ndarray:
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop=stop, seed=cfg.seed)
    outs = client.sample([list(r["prompt_tokens"]) for r in rows], 1, params)
    return np.array([grade(cfg.env, tokenizer.decode(o[0].tokens, skip_special_tokens=True), r["reference"])[0]
                     for o, r in zip(outs, rows)], dtype=float)


def evaluate_rl(start: TrainingClient, trained: TrainingClient, tokenizer, rows: list[dict], cfg: RlConfig,
                eval_cfg: EvalConfig, pass_k: int, stop: list[str]) -> dict:
    """Held-out problems, both models, paired bootstrap CIs of each gain: greedy accuracy;
    sample accuracy (the mean over k samples at temperature 1: what RL optimizes, the
    policy's own pass@1); pass@k (any of the k samples correct)."""
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, top_p=1.0, stop=stop, seed=eval_cfg.seed)
    per_problem = {}
    for name, client in (("start/", start), ("", trained)):
        groups = client.sample([list(r["prompt_tokens"]) for r in rows], pass_k, params)
        correct_N_K = np.array([[grade(cfg.env, tokenizer.decode(s.tokens, skip_special_tokens=True), r["reference"])[0] for s in g]
                                for g, r in zip(groups, rows)], dtype=float)
        per_problem[name] = {
            "test/accuracy": greedy_accuracy(client, tokenizer, rows, cfg, stop),
            "test/sample_accuracy": correct_N_K.mean(axis=1),
            f"test/pass@{pass_k}": correct_N_K.max(axis=1),
        }
    return {"num_problems": len(rows),
            **paired_report({m: (per_problem[""][m], per_problem["start/"][m]) for m in per_problem[""]}, eval_cfg)}
