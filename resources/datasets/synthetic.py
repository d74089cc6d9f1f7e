"""Seeded synthetic tasks for the embedded default: small enough that a tiny model learns
them in a minute on two CPU cores, structured enough that learning is measurable."""

from __future__ import annotations

import random

SYSTEM_PROMPT = "You are a careful calculator. Answer briefly."

def arithmetic_problem(rng: random.Random, max_operand: int = 19, min_operand: int = 0) -> tuple[str, int]:
    a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
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


def arithmetic_chats(n: int, seed: int, max_operand: int = 19, added: tuple[int, int] = (0, 9)) -> list[dict]:
    """Multi-turn chats: a sum of operands up to `max_operand` (sl_basic's range), then one or
    two "Now add d." follow-ups (d in `added`) that build on the previous answer; half open
    with a system prompt. Each answer needs the context of the turns before it, and every
    answer is a number, so accuracy is graded."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
        total = a + b
        for _ in range(rng.randint(1, 2)):
            d = rng.randint(*added)
            messages += [{"role": "user", "content": f"Now add {d}."},
                         {"role": "assistant", "content": f"{total} + {d} = {total + d}"}]
            total += d
        records.append({"messages": messages})
    return records


def arithmetic_pairs(n: int, seed: int, added: tuple[int, int] = (0, 9)) -> list[dict]:
    """Preference pairs on the multi-turn chats: the chosen last answer is right; the
    rejected one carries a near miss (off by 1 to 3), half the time in the sum and half the
    time in the number carried over from the previous turn, the mistakes a tiny model makes."""
    rng = random.Random(seed)
    pairs = []
    for chat in arithmetic_chats(n, seed, added=added):
        messages = chat["messages"]
        left, added, answer = (int(x) for x in messages[-1]["content"].replace("+", "=").split("="))
        miss = rng.choice([-3, -2, -1, 1, 2, 3])
        if rng.random() < 0.5:
            wrong = answer + (miss if answer + miss >= 0 else -miss)
            text = f"{left} + {added} = {wrong}"
        else:
            carried = left + (miss if left + miss >= 0 else -miss)
            text = f"{carried} + {added} = {carried + added}"
        pairs.append({"chosen": messages, "rejected": messages[:-1] + [{"role": "assistant", "content": text}]})
    return pairs


def arithmetic_problems(n: int, seed: int, max_operand: int = 19, min_operand: int = 0) -> list[dict]:
    """RL problems, by default from sl_basic's distribution: the question and its integer answer."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng, max_operand, min_operand)
        problems.append({"question": f"What is {expr}?", "answer": str(answer)})
    return problems


GENERATORS = {"arithmetic": arithmetic_conversations, "arithmetic_chat": arithmetic_chats, "arithmetic_pairs": arithmetic_pairs,
              # dpo's default: the chats' follow-ups add 10..19, which chat_sl never practised (it
              # answers them right only sometimes), so its own answers make pairs worth learning from
              "tens_pairs": lambda n, seed: arithmetic_pairs(n, seed, added=(10, 19)),
              # math_rl's default: sl_basic's 610 questions (operands 0..19), enough distinct ones for a held-out set
              "arithmetic_problems": arithmetic_problems,
              "one_digit_problems": lambda n, seed: arithmetic_problems(n, seed, max_operand=9),  # 155 questions
              # math_rl's out-of-distribution eval: operands no default task trains on (155 questions)
              "twenties_problems": lambda n, seed: arithmetic_problems(n, seed, max_operand=29, min_operand=20)}


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Text covering every default task, so one tokenizer serves the whole chain."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        expr, answer = arithmetic_problem(rng)
        texts.append(f"What is {expr}? {expr} = {answer}. The answer is {answer}.")
    for record in arithmetic_chats(n // 4, seed + 1, max_operand=9):  # the corpus the base tokenizer was trained on
        texts += [m["content"] for m in record["messages"]]
    texts += [str(i) for i in range(200)]
    texts += ["system", "user", "assistant", "tool", "User:", "Assistant:", "System:"] * 50
    return texts
