"""Seeded synthetic tasks for the embedded default: small enough that a tiny model learns
them in a minute on two CPU cores, structured enough that learning is measurable."""

from __future__ import annotations

import random

SYSTEM_PROMPT = "You are a careful calculator. Answer briefly."

# Follow-ups about the first turn: answering needs the conversation's context (recall), not
# new arithmetic, so a tiny model can learn them and multi-turn masking is exercised.
FOLLOW_UPS = (
    ("What was the first number?", "The first number was {a}."),
    ("What was the second number?", "The second number was {b}."),
    ("What was the answer again?", "The answer was {c}."),
)


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


def arithmetic_chats(n: int, seed: int) -> list[dict]:
    """Multi-turn chats: an arithmetic question, then one or two follow-ups that ask about
    it; half open with a system prompt. The last answer is a number, so accuracy is graded."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng)
        a, _, b = expr.split()
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": f"What is {expr}?"}, {"role": "assistant", "content": f"{expr} = {answer}"}]
        for question, reply in rng.sample(FOLLOW_UPS, rng.randint(1, 2)):
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": reply.format(a=a, b=b, c=answer)}]
        records.append({"messages": messages})
    return records


GENERATORS = {"arithmetic": arithmetic_conversations, "arithmetic_chat": arithmetic_chats}


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Text covering every default task, so one tokenizer serves the whole chain."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng)
        texts.append(f"What is {expr}? {expr} = {answer}. The answer is {answer}.")
    for record in arithmetic_chats(n // 4, seed + 1):
        texts += [m["content"] for m in record["messages"]]
    texts += [str(i) for i in range(200)]
    texts += ["system", "user", "assistant", "tool", "User:", "Assistant:", "System:"] * 50
    return texts
