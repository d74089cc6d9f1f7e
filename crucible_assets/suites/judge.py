"""Judge: a hosted model (the `models` resource) compares the trained model's greedy answer
with the starting model's on each held-out prompt, pairwise as AlpacaEval and MT-Bench do:
asked twice, in both orders, so a judge that favours the first (or second) position cancels
out. Per prompt the trained answer scores 1 for a win, 0.5 for a tie (or an unreadable
verdict), 0 for a loss, averaged over the two orders; the win rate is the mean, with a paired
bootstrap CI against the start's. Off by default: it needs a judge model and its key."""

from __future__ import annotations

import re

import numpy as np
from pydantic import Field, PositiveInt

from crucible_assets.evaluation import paired_report
from crucible_assets.suites.prompts import answers, render
from crucible_assets.suites.suite import Suite, SuiteConfig, SuiteRun

JUDGE_SYSTEM = ("You compare two answers to the same question. Judge correctness first, then helpfulness and concision. "
                "Reply with exactly one of: A, B, tie.")
VERDICT = re.compile(r"^\W*(A|B|tie)\b", re.IGNORECASE)


def question_text(prompt) -> str:
    """A conversation as the judge reads it: one `role: content` line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)


def judge_request(question: str, first: str, second: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": f"Question:\n{question}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
                                                     "Which answer is better? Reply A, B or tie."}],
            "max_tokens": max_tokens, "temperature": 0.0}


def verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the judge's reply, None when it says none of them first."""
    m = VERDICT.match(text.strip())
    return m.group(1).upper() if m and m.group(1).lower() != "tie" else ("tie" if m else None)


def trained_score(first_order: str | None, second_order: str | None) -> float:
    """The trained answer is A in the first order and B in the second."""
    win = {"A": 1.0, "B": 0.0, "tie": 0.5, None: 0.5}
    return (win[first_order] + 1.0 - win[second_order]) / 2


class JudgeConfig(SuiteConfig):
    enabled: bool = Field(default=False, description="true (with resources.models set to a judge): run it")
    num_prompts: PositiveInt = Field(default=32, description="held-out prompts judged (each twice, in both orders)")
    max_tokens: PositiveInt = Field(default=64, description="generation budget of the compared answers")
    judge_max_tokens: PositiveInt = Field(default=8, description="the judge's reply budget")


def run(r: SuiteRun) -> dict:
    cfg: JudgeConfig = r.config
    judge = r.judge()
    tokens = [render(r.tokenizer, r.renderer, p) for p in r.prompts]
    trained = [a[0] for a in answers(r.trained, tokens, 1, cfg.max_tokens, 0.0, r.stop, cfg.seed)]
    start = [a[0] for a in answers(r.start, tokens, 1, cfg.max_tokens, 0.0, r.stop, cfg.seed)]
    questions = [question_text(p) for p in r.prompts]
    requests = [judge_request(q, t, s, cfg.judge_max_tokens) for q, t, s in zip(questions, trained, start)] + \
               [judge_request(q, s, t, cfg.judge_max_tokens) for q, t, s in zip(questions, trained, start)]
    verdicts = [verdict(a.text) for a in judge.complete(requests)]
    n = len(r.prompts)
    scores = np.array([trained_score(verdicts[i], verdicts[n + i]) for i in range(n)])
    consistent = [verdicts[i] is not None and {verdicts[i], verdicts[n + i]} in ({"A", "B"}, {"tie"}) for i in range(n)]
    return {"num_prompts": n, **paired_report({"judge/win_rate": (scores, 1.0 - scores)}, cfg),
            "judge/ties": sum(v == "tie" for v in verdicts), "judge/unreadable": sum(v is None for v in verdicts),
            "judge/position_consistent": float(np.mean(consistent)), "judge/usage": judge.report(),
            "examples": [{"perturbation": "judged", "prompt": f"{questions[0]} | trained: {trained[0]} | start: {start[0]} | "
                                                               f"verdicts {verdicts[0]}, {verdicts[n]}"}]}


SUITE = Suite(name="judge", config=JudgeConfig, run=run, version="1", stage="judge_eval",
              title="Judge: pairwise win rate of the trained model's answers over the start's, by a hosted model",
              note="win_rate: 1 per prompt the judge preferred the trained answer, 0.5 a tie, averaged over both orders; "
                   "'start' is the start's win rate. position_consistent: the share of prompts whose two verdicts agree.")
