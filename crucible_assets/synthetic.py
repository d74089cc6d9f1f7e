"""Seeded synthetic tasks for the embedded default: small enough that a tiny model learns
them in a minute on two CPU cores, structured enough that learning is measurable."""

from __future__ import annotations

import random


def arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"{a} + {b}", a + b
    a, b = max(a, b), min(a, b)
    return f"{a} - {b}", a - b


def arithmetic_conversations(n: int, seed: int) -> list[dict]:
    """Single-turn chats: a question about a sum or difference and its worked answer."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {expr}?"},
                    {"role": "assistant", "content": f"{expr} = {answer}"},
                ]
            }
        )
    return records


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Text covering every default task, so one tokenizer serves the whole chain."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng)
        texts.append(f"What is {expr}? {expr} = {answer}. The answer is {answer}.")
    texts += [str(i) for i in range(200)]
    texts += ["system", "user", "assistant", "tool"] * 50
    return texts
