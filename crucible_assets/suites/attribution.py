"""Attribution: which prompt tokens drove the answer? For a few held-out prompts, integrated
gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks") of the
reference answer's log-prob, log p(answer | prompt), with respect to the prompt's input
embeddings, from a baseline prompt of end-of-sequence-token embeddings:

    IG_i = (x_i - x'_i) . (1/m) sum_{j=1..m} dF/dx_i at x' + ((j - 1/2)/m) (x - x')

summed over the embedding dimension per token. Completeness says sum_i IG_i = F(x) - F(x');
the midpoint rule gets there as m grows, and the report states each sample's relative gap
against the tolerance. Rendered as a heat map of the prompt's tokens (attribution.png)."""

from __future__ import annotations

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from crucible_assets import plots
from crucible_assets.suites.prompts import render
from crucible_assets.suites.suite import Suite, SuiteConfig, SuiteRun


CHUNK = 64  # path points per forward/backward


class AttributionConfig(SuiteConfig):
    num_prompts: PositiveInt = Field(default=4, description="held-out prompts attributed")
    steps: PositiveInt = Field(default=64, description="m, the integration steps (midpoint rule) tried first; doubled while "
                                                       "completeness misses the tolerance, up to max_steps")
    max_steps: PositiveInt = Field(default=2048, description="the most integration steps per prompt")
    tolerance: PositiveFloat = Field(default=0.01, description="completeness: |sum IG - (F(x) - F(x'))| / |F(x) - F(x')| at most this")


def answer_logprob(model, embeds_B_T_H, answer_ids, prompt_len: int):
    """F per row: the summed log-prob of the answer tokens that follow the prompt."""
    import torch

    logits_B_T_V = model(inputs_embeds=embeds_B_T_H).logits.float()
    logprobs_B_A_V = torch.log_softmax(logits_B_T_V[:, prompt_len - 1:-1], dim=-1)
    return logprobs_B_A_V.gather(-1, answer_ids.expand(len(embeds_B_T_H), -1).unsqueeze(-1)).squeeze(-1).sum(-1)


def integrated_gradients(model, prompt_ids: list[int], answer_ids: list[int], steps: int, baseline_id: int
                         ) -> tuple[np.ndarray, float, float]:
    """(per-prompt-token attributions, F(x), F(baseline)); all m steps in one batch. The
    baseline puts one token's embedding (the end-of-sequence token's) at every prompt
    position. Not zeros, nor the pad token (nn.Embedding keeps its row at zero): at a zero
    embedding RMSNorm divides by almost nothing, so F jumps within the path's first percent
    and no affordable m integrates it."""
    import torch

    model = model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    P, answer = len(prompt_ids), torch.tensor([answer_ids], device=device)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x_1_T_H = embed(ids).float()
        baseline = x_1_T_H.clone()
        base_H = embed(torch.tensor([baseline_id], device=device)).float()[0]
        if base_H.norm() < 1e-3 * x_1_T_H[0, :P].norm(dim=-1).mean():
            raise ValueError(f"token {baseline_id}'s embedding is (almost) zero: no baseline for integrated gradients")
        baseline[:, :P] = base_H  # the answer's own embeddings stay as they are
    alphas_m = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps
    grad_sum_T_H = torch.zeros_like(x_1_T_H[0])
    for chunk in alphas_m.split(CHUNK):  # a bounded batch per backward, whatever m is
        path_c_T_H = (baseline + chunk.view(-1, 1, 1) * (x_1_T_H - baseline)).requires_grad_(True)
        (grad_c_T_H,) = torch.autograd.grad(answer_logprob(model, path_c_T_H, answer, P).sum(), path_c_T_H)  # weights' .grad untouched
        grad_sum_T_H += grad_c_T_H.sum(0)
    attributions_P = ((x_1_T_H - baseline)[0, :P] * grad_sum_T_H[:P] / steps).sum(-1)
    with torch.no_grad():
        ends = answer_logprob(model, torch.cat([x_1_T_H, baseline]), answer, P)
    return attributions_P.detach().cpu().numpy(), float(ends[0]), float(ends[1])


def completeness_gap(ig: np.ndarray, f_x: float, f_base: float) -> float:
    """|sum IG - (F(x) - F(x'))| relative to the difference it must explain (absolute where
    the prompt barely matters, |F(x) - F(x')| < 1e-3 nats)."""
    return float(abs(ig.sum() - (f_x - f_base)) / max(abs(f_x - f_base), 1e-3))


def run(r: SuiteRun) -> dict:
    cfg: AttributionConfig = r.config
    tok, model = r.tokenizer, r.trained.model
    import torch

    samples = []
    for p in r.prompts[: cfg.num_prompts]:
        prompt_ids = render(tok, r.renderer, p)
        answer_ids = tok(p.reference, add_special_tokens=False)["input_ids"]
        steps = cfg.steps
        while True:
            with torch.enable_grad():
                ig, f_x, f_base = integrated_gradients(model, prompt_ids, answer_ids, steps, tok.eos_token_id)
            gap = completeness_gap(ig, f_x, f_base)
            if gap <= cfg.tolerance or steps * 2 > cfg.max_steps:
                break
            steps *= 2
        samples.append({"tokens": [tok.decode([t]) for t in prompt_ids], "attributions": ig.tolist(), "answer": p.reference,
                        "logprob": f_x, "baseline_logprob": f_base, "completeness_gap": float(gap), "steps": steps})
    plots.token_heatmap([s["tokens"] for s in samples], [s["attributions"] for s in samples],
                        [f"log p({s['answer']!r}) = {s['logprob']:.3g}; baseline {s['baseline_logprob']:.3g}" for s in samples],
                        r.out / "attribution.png")
    worst = max(s["completeness_gap"] for s in samples)
    return {"num_prompts": len(samples), "steps": max(s["steps"] for s in samples), "attribution/worst_completeness_gap": worst,
            "attribution/completeness_holds": bool(worst <= cfg.tolerance), "tolerance": cfg.tolerance, "samples": samples}


SUITE = Suite(name="attribution", config=AttributionConfig, run=run, version="1", plots=("attribution.png",),
              title="Attribution: integrated gradients of the answer's log-prob over the prompt's tokens (trained model)",
              note="Red tokens raise the log-prob of the reference answer, blue ones lower it; each row's attributions sum to "
                   "log p(answer | prompt) - log p(answer | a prompt of end-of-sequence tokens) within the stated completeness gap.")
