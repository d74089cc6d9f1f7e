"""Robustness: does a gain survive a prompt said differently? Each perturbation rewrites the
held-out prompts in a way that keeps the answer (seeded, deterministic), both models answer
greedily, and the report gives accuracy per perturbation and its drop from the clean prompt,
trained vs start, each with a paired bootstrap CI: a positive `drop` gain means training made
the model more brittle to that change."""

from __future__ import annotations

import random
import re
from typing import Callable

import numpy as np
from pydantic import Field, PositiveInt

from crucible_assets.evaluation import paired_report
from crucible_assets.suites.prompts import Prompt, answers, render
from crucible_assets.suites.suite import Suite, SuiteConfig, SuiteRun

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen " \
       "eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for an integer below a million: 47 -> "forty-seven"."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    if n < 1_000_000:
        return number_words(n // 1000) + " thousand" + (" " + number_words(n % 1000) if n % 1000 else "")
    return str(n)


def _user_turns(messages: list[dict], rewrite: Callable[[str], str], last_only: bool = False) -> list[dict]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [{**m, "content": rewrite(m["content"])} if m["role"] == "user" and (i == last or not last_only) else m
            for i, m in enumerate(messages)]


# a standalone integer: not part of a decimal, a thousands group, an ordinal, a price, LaTeX or an exponent
STANDALONE_INTEGER = re.compile(r"(?<![\w.,^{}$\\])\d+(?![\w.,^{}%\\]|,\d)")


def numbers_as_words(messages: list[dict], rng: random.Random) -> list[dict]:
    return _user_turns(messages, lambda text: STANDALONE_INTEGER.sub(lambda m: number_words(int(m.group())), text))


# (pattern, rewrites): a question form and other ways to ask it
PARAPHRASES = [
    (re.compile(r"^What is (.+)\?$"), ["Compute {0}.", "How much is {0}?", "Tell me the value of {0}.", "Calculate {0}, please."]),
    (re.compile(r"^Now add (.+)\.$"), ["Next, add {0}.", "Add {0} to that.", "Then add {0}."]),
]


def paraphrase(messages: list[dict], rng: random.Random) -> list[dict]:
    """A template of the same question; a prompt no template knows gets a polite preamble."""
    def rewrite(text: str) -> str:
        for pattern, forms in PARAPHRASES:
            if m := pattern.match(text.strip()):
                return rng.choice(forms).format(*m.groups())
        return "Please answer the following. " + text
    return _user_turns(messages, rewrite)


DISTRACTORS = ["The weather was mild that afternoon.", "My neighbour painted her fence green.",
               "Libraries are quieter in the morning.", "A train left the station on time."]


def distractor(messages: list[dict], rng: random.Random) -> list[dict]:
    """An irrelevant sentence (no numbers in it) before the last question."""
    return _user_turns(messages, lambda text: f"{rng.choice(DISTRACTORS)} {text}", last_only=True)


def whitespace_and_case(messages: list[dict], rng: random.Random) -> list[dict]:
    """Doubled spaces and words in the wrong case; a word with a digit or a backslash (LaTeX)
    and a one-letter word (a variable) keep their case."""
    def flippable(word: str) -> bool:
        return len(word) > 1 and not any(c.isdigit() or c == "\\" for c in word)

    def noisy(text: str) -> str:
        words = [w.swapcase() if flippable(w) and rng.random() < 0.3 else w for w in text.split(" ")]
        return "".join(w + (" " * rng.choice([1, 1, 2, 3]) if i < len(words) - 1 else "") for i, w in enumerate(words))
    return _user_turns(messages, noisy)


SYSTEM_PROMPT = "You are a helpful assistant."


def system_prompt(messages: list[dict], rng: random.Random) -> list[dict]:
    """A changed system prompt: a persona sentence opens it, before the conversation's own
    instructions (kept: they may fix the answer's format)."""
    own = " ".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": f"{SYSTEM_PROMPT} {own}".strip()}] + rest


PERTURBATIONS: dict[str, Callable[[list[dict], random.Random], list[dict]]] = {
    "numbers_as_words": numbers_as_words, "paraphrase": paraphrase, "distractor": distractor,
    "whitespace_and_case": whitespace_and_case, "system_prompt": system_prompt}


def perturb(prompts: list[Prompt], name: str, seed: int) -> list[Prompt]:
    rng = random.Random(f"{name}:{seed}")
    return [Prompt(PERTURBATIONS[name](p.messages, rng), p.reference) for p in prompts]


class RobustnessConfig(SuiteConfig):
    perturbations: list[str] = Field(default=list(PERTURBATIONS), description=f"any of {', '.join(PERTURBATIONS)}")
    max_tokens: PositiveInt = Field(default=24, description="generation budget per answer")


def run(r: SuiteRun) -> dict:
    cfg: RobustnessConfig = r.config
    if unknown := set(cfg.perturbations) - set(PERTURBATIONS):
        raise ValueError(f"eval_robustness config: perturbations {sorted(unknown)} are not among {sorted(PERTURBATIONS)}")
    sets = {"clean": r.prompts, **{p: perturb(r.prompts, p, cfg.seed) for p in cfg.perturbations}}
    correct, skipped = {}, {}
    for name, prompts in list(sets.items()):
        try:
            tokens = [render(r.tokenizer, r.renderer, p) for p in prompts]
        except Exception as e:  # noqa: BLE001 - a template that refuses a system prompt, say: that rewrite is not askable
            if name == "clean":
                raise
            skipped[name] = f"{type(e).__name__}: {e}"
            del sets[name]
            continue
        for model, client in (("trained", r.trained), ("start", r.start)):
            got = answers(client, tokens, 1, cfg.max_tokens, 0.0, r.stop, cfg.seed)
            correct[name, model] = np.array([r.grader(a[0], p.reference)[0] for a, p in zip(got, prompts)], dtype=float)
    per_example = {f"robustness/{name}/accuracy": (correct[name, "trained"], correct[name, "start"]) for name in sets}
    per_example |= {f"robustness/{name}/drop": (correct["clean", "trained"] - correct[name, "trained"],
                                                correct["clean", "start"] - correct[name, "start"]) for name in sets if name != "clean"}
    examples = [{"perturbation": name, "prompt": sets[name][0].messages[-1]["content"]} for name in sets]
    return {"num_prompts": len(r.prompts), **paired_report(per_example, cfg), "examples": examples,
            **({"skipped_perturbations": skipped} if skipped else {})}


SUITE = Suite(name="robustness", config=RobustnessConfig, run=run, version="1",
              title="Robustness: accuracy on perturbed held-out prompts, and its drop from the clean prompt",
              note="drop: clean accuracy - perturbed accuracy of the same prompts (lower is better); its gain is trained's "
                   "drop - start's drop: above zero, training made the model more brittle to that change.")
