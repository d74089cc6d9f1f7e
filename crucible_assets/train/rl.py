"""RL with verifiable rewards, read top to bottom: config, a rollout (sample a group of
answers per problem and grade them), advantages (rewards centered within each group, less
an optional per-token KL penalty), the datums, the update step on the shared loop, the
held-out evaluation, the algorithm. Metric names follow tinker-cookbook.

Masks cover sampled tokens only: the prompt carries weight, advantage and sampler
log-prob 0, and padding never reaches the loss (the backend masks it).

Shape suffixes: _G one value per sample of a group, _T per sampled token, _N per problem
(or group), _N_K per problem and sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from crucible_assets.evaluation import EvalConfig, greedy_accuracy, paired_report
from crucible_assets.tokenizing import read_rows, read_stop
from crucible_assets.train.algorithm import Algorithm, EvalRun, TrainingRun
from crucible_assets.train.loop import TrainConfig, layout_metrics, train
from resources.backends.types import Datum, SampledSequence, SamplingParams, TrainingClient
from resources.datasets.graders import GRADERS, Env


GroupSize = Annotated[int, Field(ge=2)]  # centering within a group needs two samples


class RlConfig(TrainConfig):
    batch_size: PositiveInt = Field(default=16, description="groups_per_batch: problems per step, each sampled group_size times")
    env: Env = Field(default="arithmetic", description="grader of the answers")
    group_size: GroupSize = Field(default=8, description="samples per problem; advantages are centered within the group")
    max_tokens: PositiveInt = 16
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    loss_fn: Literal["importance_sampling", "ppo"] = "importance_sampling"
    clip_low_threshold: float = Field(default=0.8, description="ppo: lower bound of the probability ratio")
    clip_high_threshold: float = Field(default=1.2, description="ppo: upper bound of the probability ratio")
    advantage_std_normalize: bool = Field(default=False, description="divide each group's centered rewards by its std")
    remove_constant_reward_groups: bool = Field(default=False, description="drop groups whose samples all got the same reward")
    format_coef: float = Field(default=0.1, description="reward = correct + format_coef * (formatted - 1)")
    kl_penalty_coef: NonNegativeFloat = Field(default=0.0, description="> 0 penalizes per-token KL to kl_reference")
    kl_reference: Literal["", "base_model"] = Field(default="", description="'' (none) or 'base_model': the frozen starting model")
    eval_problems: int = Field(default=64, description="held-out problems for the in-loop greedy accuracy")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.kl_penalty_coef > 0 and self.kl_reference != "base_model":
            found.append("kl_penalty_coef > 0 needs a reference model: set kl_reference: base_model")
        return found


class RlEvalConfig(EvalConfig):
    # the gate's sample accuracy is an expectation over samples: 8 per problem left most of a
    # paired CI's width to sampling noise (measured: half-width 0.07 on 116 problems)
    samples_per_problem: PositiveInt = Field(default=32, description="samples per problem (temperature 1) for sample accuracy")
    pass_k: PositiveInt = Field(default=8, description="pass@k from the first k of those samples")

    @model_validator(mode="after")
    def _k_within_samples(self):
        if self.pass_k > self.samples_per_problem:
            raise ValueError(f"pass_k ({self.pass_k}) cannot exceed samples_per_problem ({self.samples_per_problem})")
        return self


@dataclass
class GroupRollout:
    """One problem's group: the prompt, its sampled answers and their grades."""
    prompt: list[int]
    samples_G: list[SampledSequence]
    correct_G: np.ndarray
    formatted_G: np.ndarray
    rewards_G: np.ndarray


def rollout(client: TrainingClient, problems: list[dict], cfg: RlConfig, stop: list[str], seed: int) -> list[GroupRollout]:
    """group_size answers per problem, graded; reward = correct + format_coef * (formatted - 1)."""
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop=stop, seed=seed)
    groups = client.sample([list(p["prompt_tokens"]) for p in problems], cfg.group_size, params)
    rollouts = []
    for problem, group in zip(problems, groups):
        graded = [GRADERS[cfg.env](client.tokenizer.decode(s.tokens, skip_special_tokens=True), problem["reference"])
                  for s in group]
        correct_G = np.array([c for c, _ in graded], dtype=float)
        formatted_G = np.array([f for _, f in graded], dtype=float)
        rollouts.append(GroupRollout(problem["prompt_tokens"], group, correct_G, formatted_G,
                                     correct_G + cfg.format_coef * (formatted_G - 1)))
    return rollouts


def group_advantages(rewards_G: np.ndarray, std_normalize: bool) -> np.ndarray:
    centered_G = rewards_G - rewards_G.mean()
    if std_normalize:
        centered_G = centered_G / (rewards_G.std() + 1e-8)
    return centered_G


def token_advantages(rollouts: list[GroupRollout], cfg: RlConfig,
                     reference: TrainingClient | None) -> list[tuple[list[int], SampledSequence, np.ndarray]]:
    """(prompt, sample, advantage_T) of every sample: each token carries its group's centered
    reward, less kl_penalty_coef * (log p_sampler - log p_reference) when penalized."""
    samples = [(g.prompt, s, a) for g in rollouts
               for s, a in zip(g.samples_G, group_advantages(g.rewards_G, cfg.advantage_std_normalize))]
    advantages = [np.full(len(s.tokens), a) for _, s, a in samples]
    if cfg.kl_penalty_coef > 0 and samples:
        ref_lps = reference.compute_logprobs([list(p) + s.tokens for p, s, _ in samples])
        for i, ((p, s, _), ref_lp) in enumerate(zip(samples, ref_lps)):
            advantages[i] = advantages[i] - cfg.kl_penalty_coef * (np.array(s.logprobs) - np.array(ref_lp[len(p) - 1:]))
    return [(p, s, adv_T) for (p, s, _), adv_T in zip(samples, advantages)]


def rl_datum(prompt: list[int], sample: SampledSequence, token_advantages: np.ndarray, scale: float) -> Datum:
    """prompt + sampled tokens; per-token inputs are zero on the prompt."""
    n_p, n_s = len(prompt), len(sample.tokens)
    return Datum.from_sequence(
        prompt + sample.tokens,
        [0.0] * n_p + [1.0] * n_s,
        logprobs=[0.0] * n_p + list(sample.logprobs),
        advantages=[0.0] * n_p + list(token_advantages * scale),
    )


def env_metrics(rollouts: list[GroupRollout]) -> dict:
    rewards_N, correct_N = [g.rewards_G for g in rollouts], [g.correct_G for g in rollouts]
    all_good = [float(r.min() == r.max() and c.all()) for r, c in zip(rewards_N, correct_N)]
    all_bad = [float(r.min() == r.max() and not c.any()) for r, c in zip(rewards_N, correct_N)]
    return {
        "env/all/reward/total": float(np.concatenate(rewards_N).mean()),
        "env/all/correct": float(np.concatenate(correct_N).mean()),
        "env/all/format": float(np.concatenate([g.formatted_G for g in rollouts]).mean()),
        "env/all/by_group/frac_mixed": float(np.mean([np.ptp(r) > 0 for r in rewards_N])),
        "env/all/by_group/frac_all_good": float(np.mean(all_good)),
        "env/all/by_group/frac_all_bad": float(np.mean(all_bad)),
        "env/all/ac_tokens_per_turn": float(np.mean([len(s.tokens) for g in rollouts for s in g.samples_G])),
    }


def update(client: TrainingClient, samples: list[tuple[list[int], SampledSequence, np.ndarray]], cfg: RlConfig) -> dict:
    """One forward/backward of the policy-gradient loss on the sampled tokens, normalized by
    their count; metrics compare the sampler's log-probs with the trainer's."""
    if not samples:
        return {"loss:sum": 0.0, "num_tokens": 0}
    n_sampled = sum(len(s.tokens) for _, s, _ in samples)
    data = [rl_datum(list(p), s, adv_T, 1.0 / max(n_sampled, 1)) for p, s, adv_T in samples]
    fb = client.forward_backward(data, cfg.loss_fn, {"clip_low_threshold": cfg.clip_low_threshold,
                                                     "clip_high_threshold": cfg.clip_high_threshold})
    train_lp = np.concatenate([out["logprobs"][len(p) - 1:].numpy() for (p, _, _), out in zip(samples, fb.loss_fn_outputs)])
    sampler_lp = np.concatenate([np.array(s.logprobs) for _, s, _ in samples])
    metrics = {"optim/kl_sample_train_v1": float((sampler_lp - train_lp).mean()),
               "optim/entropy": float(-sampler_lp.mean()), "loss:sum": fb.metrics["loss:sum"],
               **layout_metrics(fb.metrics, [list(p) + s.tokens for p, s, _ in samples])}
    if "clip_fraction" in fb.metrics:
        metrics["optim/clip_fraction"] = fb.metrics["clip_fraction"]
    return metrics


def train_rl(
    client: TrainingClient,
    reference: TrainingClient | None,
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
        rollouts = rollout(client, problems, cfg, stop, seed=cfg.seed * 1_000_003 + step_no)
        seconds["time/sample"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        kept = [g for g in rollouts if not (cfg.remove_constant_reward_groups and np.ptp(g.rewards_G) == 0)]
        row = {**env_metrics(rollouts), "num_groups": len(problems), "num_groups_trained": len(kept),
               **update(client, token_advantages(kept, cfg, reference), cfg)}
        seconds["time/train"] += time.perf_counter() - t1
        return row

    eval_rows = test_rows[: cfg.eval_problems]

    def evaluate() -> dict:
        return {"test/accuracy": float(greedy_accuracy(client, client.tokenizer, eval_rows, GRADERS[cfg.env], cfg.max_tokens,
                                                       stop, cfg.seed).mean())}

    rows, telemetry = train(client, len(train_rows), cfg, work_dir, step, evaluate, "env/all/reward/total", log)
    return rows, telemetry | seconds


def train_run(run: TrainingRun) -> tuple[list[dict], dict]:
    cfg, base_model = run.config, run.inputs["base_model"]
    reference = run.backend.create_training_client(base_model.dir, 0, cfg.seed) if cfg.kl_penalty_coef > 0 else None
    tokenized = run.inputs["tokenized"]
    return train_rl(run.client, reference, read_rows(tokenized, "train"), read_rows(tokenized, "test"), cfg,
                    read_stop(tokenized), run.work, run.log)


def evaluate_rl(run: EvalRun) -> dict:
    """Held-out problems, both models, paired bootstrap CIs of each gain: greedy accuracy;
    sample accuracy (the mean over k samples at temperature 1: what RL optimizes, the
    policy's own pass@1); pass@k (any of the k samples correct). Problems from outside the
    training distribution (the test_ood split, where the dataset has one) get the same
    metrics under test_ood/: whether the gain generalises, reported apart, read by no gate."""
    report = {"num_problems": len(run.rows), **problem_report(run, run.rows, "test")}
    if run.ood_rows:
        report |= {"num_ood_problems": len(run.ood_rows), **problem_report(run, run.ood_rows, "test_ood")}
    return report


def problem_report(run: EvalRun, rows: list[dict], split: str) -> dict:
    """One split's metrics, named `<split>/...`, for both models with paired CIs."""
    cfg, eval_cfg, pass_k = run.train_config, run.config, run.config.pass_k
    tokenizer, grader = run.trained.tokenizer, GRADERS[cfg.env]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, top_p=1.0, stop=run.stop, seed=eval_cfg.seed)
    per_problem = {}
    for name, client in (("start/", run.start), ("", run.trained)):
        groups = client.sample([list(r["prompt_tokens"]) for r in rows], eval_cfg.samples_per_problem, params)
        correct_N_K = np.array([[grader(tokenizer.decode(s.tokens, skip_special_tokens=True), r["reference"])[0] for s in g]
                                for g, r in zip(groups, rows)], dtype=float)
        per_problem[name] = {
            f"{split}/accuracy": greedy_accuracy(client, tokenizer, rows, grader, cfg.max_tokens, run.stop, cfg.seed),
            f"{split}/sample_accuracy": correct_N_K.mean(axis=1),
            f"{split}/pass@{pass_k}": correct_N_K[:, :pass_k].max(axis=1),
        }
    return paired_report({m: (per_problem[""][m], per_problem["start/"][m]) for m in per_problem[""]}, eval_cfg)


ALGORITHM = Algorithm(
    name="rl",
    data_kind="problems",
    train_config=RlConfig,
    eval_config=RlEvalConfig,
    train=train_run,
    evaluate=evaluate_rl,
    loss_key="env/all/reward/total",
    eval_key="test/accuracy",
    report_metric=("test/sample_accuracy", "held-out sample accuracy (T=1)"),
    plot_training_curve=True,
    eval_version="5",  # 4: test_ood/ metrics and a verdict column; 5: sample accuracy over samples_per_problem
    checkpoint_description="RL with verifiable rewards: groups of sampled answers per problem, group-centered rewards, "
                           "importance-sampling or PPO loss on the sampled tokens; HF model dir, state, metrics, reward curve.",
    eval_description="Greedy accuracy, sample accuracy and pass@k on held-out problems vs. the starting "
                     "model, with paired bootstrap CIs (and on out-of-distribution problems as test_ood/, reported "
                     "apart), and the training reward curve.",
)
