"""What an eval suite asks: the dataset's held-out records as prompts that end with the user's
turn, each with its reference answer, rendered exactly as the recipe's tokenized shard renders
them, answered by a model, and graded by the recipe's own grader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crucible_assets.rendering import prompt_and_reference
from resources.backends.types import SamplingParams, TrainingClient
from resources.datasets.graders import GRADERS, grade_conversation
from resources.store.jsonl import read_jsonl


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]  # ends with the user's turn
    reference: str


def as_prompt(record: dict) -> Prompt | None:
    """A problem's question, a conversation (or a pair's chosen side) up to its last assistant
    message; None for plain text, which has no question to ask."""
    if "question" in record:
        return Prompt([{"role": "user", "content": record["question"]}], str(record["answer"]))
    messages = record.get("chosen") or record.get("messages")
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return Prompt(messages[:-1], messages[-1]["content"])


def held_out_prompts(dataset_dir: Path, limit: int) -> list[Prompt]:
    """The first `limit` prompted records of the test split (the split is seeded and shuffled)."""
    prompts = [p for p in map(as_prompt, read_jsonl(dataset_dir / "test.jsonl")) if p is not None]
    return prompts[:limit]


def render(tok, renderer: str, prompt: Prompt) -> list[int]:
    tokens, _ = prompt_and_reference(tok, {"messages": prompt.messages + [{"role": "assistant", "content": prompt.reference}]},
                                     renderer)
    return tokens


def grader_for(train_config):
    """Problems are graded by their env's grader (math_rl, distillation); conversations by the
    last number of the reference."""
    env = getattr(train_config, "env", None)
    return GRADERS[env] if env else grade_conversation


def answers(client: TrainingClient, prompts: list[list[int]], k: int, max_tokens: int, temperature: float, stop: list[str],
            seed: int) -> list[list[str]]:
    """k decoded answers per prompt (one batched call)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
    tok = client.tokenizer
    return [[tok.decode(s.tokens, skip_special_tokens=True) for s in group] for group in client.sample(prompts, k, params)]
