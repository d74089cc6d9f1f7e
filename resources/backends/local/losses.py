"""The backend's built-in losses, with Tinker's definitions: sums over tokens, so that
weights carry any normalisation the caller wants (divide by the batch's token count for a
mean).

Each takes per-token target log-probs `logprobs_B_T` of the policy and the batch's
per-token inputs, all (B, T) with zeros on padding, and returns (loss, metrics).
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def cross_entropy(logprobs_B_T: torch.Tensor, inputs: Tensors, config: dict) -> tuple[torch.Tensor, dict]:
    loss = -(inputs["weights"] * logprobs_B_T).sum()
    return loss, {"loss:sum": loss.item()}


def importance_sampling(logprobs_B_T: torch.Tensor, inputs: Tensors, config: dict) -> tuple[torch.Tensor, dict]:
    """REINFORCE with an importance weight for the sampler/learner mismatch."""
    ratio_B_T = torch.exp(logprobs_B_T - inputs["logprobs"])
    loss = -(ratio_B_T * inputs["advantages"]).sum()
    return loss, {"loss:sum": loss.item()}


def ppo(logprobs_B_T: torch.Tensor, inputs: Tensors, config: dict) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate; thresholds bound the probability ratio (default 0.8 .. 1.2)."""
    low = config.get("clip_low_threshold", 0.8)
    high = config.get("clip_high_threshold", 1.2)
    ratio_B_T = torch.exp(logprobs_B_T - inputs["logprobs"])
    adv_B_T = inputs["advantages"]
    surrogate_B_T = torch.minimum(ratio_B_T * adv_B_T, ratio_B_T.clamp(low, high) * adv_B_T)
    loss = -surrogate_B_T.sum()
    # sampled tokens only (weights mark them); the prompt's ratios mean nothing
    mask_B_T = (inputs["weights"] > 0).float() if "weights" in inputs else inputs["mask"]
    clipped = ((ratio_B_T < low) | (ratio_B_T > high)).float() * mask_B_T
    return loss, {"loss:sum": loss.item(), "clip_fraction": (clipped.sum() / mask_B_T.sum().clamp(min=1)).item()}


BUILTIN_LOSSES = {"cross_entropy": cross_entropy, "importance_sampling": importance_sampling, "ppo": ppo}
