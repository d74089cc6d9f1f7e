"""Self-consistency and ensembles: does a vote beat one answer? maj@k samples k answers per
prompt and keeps the most common final answer (Wang et al. 2022, "Self-Consistency Improves
Chain of Thought Reasoning"); it is reported for the trained and the starting model, against
their greedy answer, with paired CIs. With `members` (registry specs such as
`math_rl@champion`), the members' greedy answers are combined, by majority vote or, when
they share a tokenizer, by decoding from their averaged log-probs, and the ensemble is
compared with its best single member on the same prompts."""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from crucible_assets.evaluation import paired_report
from crucible_assets.suites.prompts import answers, render
from crucible_assets.suites.suite import Suite, SuiteConfig, SuiteRun
from resources.datasets.graders import last_boxed, last_number


def final_answer(completion: str) -> str | None:
    """What a vote counts: the last \\boxed{} answer, else the last number, else the trimmed text."""
    return last_boxed(completion) or last_number(completion) or (completion.strip() or None)


def majority_vote(completions: list[str]) -> int:
    """Index of the completion whose final answer is the most common; a tie goes to the answer
    seen first, and a completion with no answer never wins over one with an answer."""
    keys = [final_answer(c) for c in completions]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return 0
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


class SelfConsistencyConfig(SuiteConfig):
    """A vote of two members is the first member's answer whenever they disagree (a tie goes
    to the answer seen first): voting takes three or more."""

    k: PositiveInt = Field(default=5, description="samples per prompt for maj@k")
    temperature: float = Field(default=0.7, gt=0.0, description="sampling temperature of the k samples")
    max_tokens: PositiveInt = Field(default=24)
    members: list[str] = Field(default_factory=list, description="registered models to ensemble (e.g. math_rl@champion): "
                                                                 "three or more to vote, two or more to average; empty: none")
    combine: Literal["vote", "logprob_mean"] = Field(default="vote", description="majority vote of the members' greedy "
                                                     "answers, or greedy decoding of their mean log-probs (one tokenizer)")


def maj_at_k(client, tokens, prompts, grader, cfg: SelfConsistencyConfig, stop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt: maj@k correct, mean sample accuracy, greedy correct."""
    samples = answers(client, tokens, cfg.k, cfg.max_tokens, cfg.temperature, stop, cfg.seed)
    greedy = answers(client, tokens, 1, cfg.max_tokens, 0.0, stop, cfg.seed)
    maj = [grader(group[majority_vote(group)], p.reference)[0] for group, p in zip(samples, prompts)]
    mean = [np.mean([grader(s, p.reference)[0] for s in group]) for group, p in zip(samples, prompts)]
    return np.array(maj, float), np.array(mean, float), np.array([grader(g[0], p.reference)[0] for g, p in zip(greedy, prompts)], float)


def logprob_mean_greedy(models: list, prompts: list[list[int]], max_tokens: int, pad_id: int,
                        stop_ids: list[int]) -> list[list[int]]:
    """Greedy decoding from the members' mean next-token log-probs (one vocabulary). Whole
    sequences each step, no KV cache: members differ, and eval answers are short."""
    import torch

    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(max_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        width = max(len(seqs[i]) for i in live)
        device = next(models[0].parameters()).device
        ids = torch.tensor([[pad_id] * (width - len(seqs[i])) + seqs[i] for i in live], device=device)
        mask = torch.tensor([[0] * (width - len(seqs[i])) + [1] * len(seqs[i]) for i in live], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            lp = sum(torch.log_softmax(m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float(), -1)
                     for m in models) / len(models)
        for i, token in zip(live, lp.argmax(-1).tolist()):
            seqs[i].append(token)
            done[i] = token in stop_ids
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def ensemble(r: SuiteRun) -> dict:
    cfg: SelfConsistencyConfig = r.config
    members = r.members(cfg.members)
    tokens = {spec: [render(c.tokenizer, r.renderer, p) for p in r.prompts] for spec, c in members.items()}  # each its own ids
    greedy = {spec: answers(c, tokens[spec], 1, cfg.max_tokens, 0.0, r.stop, cfg.seed) for spec, c in members.items()}
    correct = {spec: np.array([r.grader(a[0], p.reference)[0] for a, p in zip(got, r.prompts)], float)
               for spec, got in greedy.items()}
    if cfg.combine == "vote":
        combined = [majority_vote([greedy[s][i][0] for s in members]) for i in range(len(r.prompts))]
        texts = [greedy[list(members)[j]][i][0] for i, j in enumerate(combined)]
    else:
        first, *others = members.values()
        if any(c.tokenizer.get_vocab() != first.tokenizer.get_vocab() for c in others):
            raise ValueError("combine: logprob_mean averages next-token log-probs, so the members need one vocabulary; "
                             "theirs differ (use combine: vote)")
        if not all(hasattr(c, "model") for c in members.values()):
            raise ValueError("combine: logprob_mean needs the members' weights in this process (the local backend)")
        tok = first.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = logprob_mean_greedy([c.model.eval() for c in members.values()], tokens[cfg.members[0]], cfg.max_tokens, pad,
                                  [tok.eos_token_id])
        texts = [tok.decode(t, skip_special_tokens=True) for t in out]
    ens = np.array([r.grader(t, p.reference)[0] for t, p in zip(texts, r.prompts)], float)
    best = max(correct, key=lambda s: correct[s].mean())
    return {"ensemble/members": {s: float(c.mean()) for s, c in correct.items()}, "ensemble/best_member": best,
            "ensemble/combine": cfg.combine, **paired_report({"ensemble/accuracy_vs_best_member": (ens, correct[best])}, cfg)}


def run(r: SuiteRun) -> dict:
    cfg: SelfConsistencyConfig = r.config
    tokens = [render(r.tokenizer, r.renderer, p) for p in r.prompts]
    got = {name: maj_at_k(client, tokens, r.prompts, r.grader, cfg, r.stop) for name, client in (("trained", r.trained), ("start", r.start))}
    (maj_t, mean_t, greedy_t), (maj_s, mean_s, greedy_s) = got["trained"], got["start"]
    report = {"num_prompts": len(r.prompts), "k": cfg.k, "temperature": cfg.temperature, **paired_report({
        f"self_consistency/maj@{cfg.k}": (maj_t, maj_s), "self_consistency/sample_accuracy": (mean_t, mean_s),
        "self_consistency/greedy_accuracy": (greedy_t, greedy_s),
        f"self_consistency/maj@{cfg.k}_minus_greedy": (maj_t - greedy_t, maj_s - greedy_s)}, cfg)}
    return report | (ensemble(r) if cfg.members else {})


SUITE = Suite(name="self_consistency", config=SelfConsistencyConfig, run=run, version="1",
              title="Self-consistency (maj@k) and ensembles",
              note="maj@k: the most common final answer of k samples, graded; maj@k_minus_greedy above zero: voting beats one "
                   "greedy answer. ensemble/accuracy_vs_best_member (when members are set): 'trained' is the ensemble, "
                   "'start' its best single member.")
