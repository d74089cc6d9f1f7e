"""DPO: the loss family (sigmoid, ipo, hinge; TRL's definitions and metric names), the
frozen reference's log-probs, and the training step on the shared loop.

A completion's log-prob is the sum over its loss-weighted tokens (the last assistant
message and its end-of-turn token; prompt and padding masked). IPO uses the per-token
average instead, for policy and reference alike, as TRL does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from crucible_assets.evaluation import EvalConfig, nll_per_example, paired_report, sampled_accuracy
from crucible_assets.training import TrainConfig, layout_metrics, train
from resources.training_backend import Datum, TrainingClient

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DpoConfig(TrainConfig):
    beta: float = Field(default=0.1, description="strength of the implicit KL to the reference")
    loss_type: str = Field(default="sigmoid", description="sigmoid | ipo | hinge")
    label_smoothing: float = Field(default=0.0, description="sigmoid only: assumed label noise (conservative DPO)")
    sft_weight: float = Field(default=0.0, description="weight of an added NLL term on the chosen completion (TRL's rpo_alpha)")

    def problems(self) -> list[str]:
        found = super().problems()
        if not (self.beta > 0 and np.isfinite(self.beta)):
            found.append(f"beta must be a positive number, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            found.append(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            found.append(f"sft_weight must be >= 0, got {self.sft_weight}")
        return found


def dpo_loss(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta: float, loss_type: str,
             label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards beta * (policy - reference) of each side."""
    import torch
    import torch.nn.functional as F

    logits_P = (policy_chosen_P - policy_rejected_P) - (ref_chosen_P - ref_rejected_P)
    if loss_type == "sigmoid":
        losses_P = -F.logsigmoid(beta * logits_P) * (1 - label_smoothing) - F.logsigmoid(-beta * logits_P) * label_smoothing
    elif loss_type == "hinge":
        losses_P = torch.relu(1 - beta * logits_P)
    elif loss_type == "ipo":
        losses_P = (logits_P - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_rewards_P = beta * (policy_chosen_P - ref_chosen_P).detach()
    rejected_rewards_P = beta * (policy_rejected_P - ref_rejected_P).detach()
    return losses_P, chosen_rewards_P, rejected_rewards_P


def reward_metrics(losses_P, chosen_rewards_P, rejected_rewards_P, policy_chosen_P, policy_rejected_P, prefix: str = "") -> dict:
    """TRL's names: dpo_loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}."""
    return {
        f"{prefix}dpo_loss": losses_P.mean().item(),
        f"{prefix}rewards/chosen": chosen_rewards_P.mean().item(),
        f"{prefix}rewards/rejected": rejected_rewards_P.mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards_P - rejected_rewards_P).mean().item(),
        f"{prefix}rewards/accuracies": (chosen_rewards_P > rejected_rewards_P).float().mean().item(),
        f"{prefix}logps/chosen": policy_chosen_P.detach().mean().item(),
        f"{prefix}logps/rejected": policy_rejected_P.detach().mean().item(),
    }


def completion_logps(client: TrainingClient, rows: list[dict]) -> dict[str, np.ndarray]:
    """Summed completion log-probs and completion token counts of both sides of each pair."""
    out = {}
    for side in ("chosen", "rejected"):
        nll, count = nll_per_example(client, [(r[f"{side}_tokens"], r[f"{side}_weights"]) for r in rows])
        out[f"{side}_logps"], out[f"{side}_tokens"] = -nll, count
    return out


def _scores(logps: dict, ipo: bool) -> tuple[np.ndarray, np.ndarray]:
    if ipo:
        return logps["chosen_logps"] / logps["chosen_tokens"], logps["rejected_logps"] / logps["rejected_tokens"]
    return logps["chosen_logps"], logps["rejected_logps"]


def train_dpo(
    client: TrainingClient,
    train_rows: list[dict],
    train_ref: dict[str, np.ndarray],
    test_rows: list[dict],
    test_ref: dict[str, np.ndarray],
    cfg: DpoConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    import torch

    ipo = cfg.loss_type == "ipo"
    ref_chosen_N, ref_rejected_N = (torch.tensor(x) for x in _scores(train_ref, ipo))

    def step(_step: int, indices: list[int]) -> dict:
        batch = [train_rows[i] for i in indices]
        P = len(batch)
        sequences = [(r[f"{side}_tokens"], r[f"{side}_weights"]) for side in ("chosen", "rejected") for r in batch]
        data = [Datum.from_sequence(t, w) for t, w in sequences]
        weights = [torch.tensor(d.loss_fn_inputs["weights"]) for d in data]

        def loss_fn(_data, logprobs):
            dev = logprobs[0].device
            sums_2P = torch.stack([(lp.double() * w.to(dev)).sum() for lp, w in zip(logprobs, weights)])
            counts_2P = torch.tensor([w.sum().item() for w in weights], dtype=torch.float64, device=dev)
            scores_2P = sums_2P / counts_2P if ipo else sums_2P
            losses_P, chosen_r, rejected_r = dpo_loss(scores_2P[:P], scores_2P[P:], ref_chosen_N[indices].to(dev),
                                                      ref_rejected_N[indices].to(dev), cfg.beta, cfg.loss_type, cfg.label_smoothing)
            loss = losses_P.mean()
            metrics = reward_metrics(losses_P, chosen_r, rejected_r, scores_2P[:P], scores_2P[P:])
            if cfg.sft_weight:
                nll = -sums_2P[:P].sum() / counts_2P[:P].sum()
                loss = loss + cfg.sft_weight * nll
                metrics["sft_nll"] = nll.item()
            return loss.float(), metrics

        fb = client.forward_backward_custom(data, loss_fn)
        return {**{k: v for k, v in fb.metrics.items() if ":" not in k}, "num_pairs": P,
                **layout_metrics(fb.metrics, [t for t, _ in sequences])}

    def evaluate() -> dict:
        policy = completion_logps(client, test_rows)
        return held_out_metrics(policy, test_ref, cfg, prefix="test/")

    return train(client, len(train_rows), cfg, work_dir, step, evaluate, "dpo_loss", log)


def held_out_metrics(policy: dict, ref: dict, cfg: DpoConfig, prefix: str) -> dict:
    import torch

    ipo = cfg.loss_type == "ipo"
    (pc, pr), (rc, rr) = (tuple(torch.tensor(x) for x in _scores(d, ipo)) for d in (policy, ref))
    return reward_metrics(*dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing), pc, pr, prefix=prefix)


def evaluate_preferences(start: TrainingClient, trained: TrainingClient, tokenizer, rows: list[dict], cfg: EvalConfig,
                         dpo: DpoConfig, stop: list[str]) -> dict:
    """Held-out pairs, with the start as the reference. `test/pref_accuracy` ranks each pair
    by the implicit reward margin beta * ((policy - ref)_chosen - (policy - ref)_rejected),
    a tie counting half, so the starting policy (margin 0 everywhere) scores exactly 0.5;
    TRL's strict `rewards/accuracies` and the other reward metrics are reported as well.
    `test/logp_ranking_accuracy` asks the plainer question, chosen log-prob above rejected,
    for both models. Greedy answer accuracy before and after completes the report."""
    policy, reference = completion_logps(trained, rows), completion_logps(start, rows)
    n = len(rows)
    (pc, pr), (rc, rr) = (_scores(d, dpo.loss_type == "ipo") for d in (policy, reference))
    margins = dpo.beta * ((pc - rc) - (pr - rr))
    per_pair = {
        "test/pref_accuracy": ((margins > 0) + 0.5 * (margins == 0), np.full(n, 0.5)),
        "test/rewards/margins": (margins, np.zeros(n)),
        "test/logp_ranking_accuracy": ((policy["chosen_logps"] > policy["rejected_logps"]).astype(float),
                                       (reference["chosen_logps"] > reference["rejected_logps"]).astype(float)),
    }
    report: dict = {"num_pairs": n, **held_out_metrics(policy, reference, dpo, prefix="test/"), **paired_report(per_pair, cfg)}
    return report | sampled_accuracy(start, trained, tokenizer, rows, cfg, stop)
