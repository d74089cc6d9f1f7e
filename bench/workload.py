"""The shared workload of every row: a ~10M-parameter Llama on Crucible's locally trained
tokenizer (built as base/tiny_llama is, larger), and seeded synthetic chats of mixed
lengths (single-turn questions and two- to three-turn follow-ups), pairs and problems,
tokenized by Crucible's own renderer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crucible_assets.base import build_tiny_llama, train_tokenizer
from crucible_assets.rendering import stop_sequences
from resources.datasets.synthetic import arithmetic_chats, arithmetic_conversations, arithmetic_pairs, arithmetic_problems
from crucible_assets.tokenizing import Renderer, pair_row, problem_row, sft_row
from resources.hf_io import load_tokenizer

MODEL = {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1024, "max_position_embeddings": 512}
MAX_LENGTH = 128


@dataclass
class Workload:
    model_dir: Path
    tokenizer: object
    parameters: int
    chats: list[dict]      # {"messages": [...]} records, mixed lengths
    sft_rows: list[dict]   # tokenizing.sft_row output for each chat
    pairs: list[dict]      # {"chosen": [...], "rejected": [...]} records
    pair_rows: list[dict]
    problems: list[dict]   # {"question", "answer"} records
    problem_rows: list[dict]
    stop: list[str]
    config: dict

    def model_layout(self) -> dict:
        return MODEL | {"vocab_size": len(self.tokenizer)}


def mixed_chats(n: int, seed: int) -> list[dict]:
    """Alternating single-turn and multi-turn chats: 20 to 80 tokens each."""
    single, multi = arithmetic_conversations(n, seed), arithmetic_chats(n, seed + 1)
    return [single[i] if i % 2 else multi[i] for i in range(n)]


def _rows(builder, renderer: Renderer, records: list[dict]) -> list[dict]:
    return [builder(renderer, r, lambda: f"record {i}")[0] for i, r in enumerate(records)]


def build_workload(root: Path, num_chats: int, num_pairs: int, num_problems: int, seed: int = 0) -> Workload:
    root.mkdir(parents=True, exist_ok=True)
    train_tokenizer(root / "tokenizer", 1024, seed)
    parameters = build_tiny_llama(root / "tokenizer", root / "model", MODEL["hidden_size"], MODEL["num_layers"],
                                  MODEL["num_heads"], MODEL["intermediate_size"], MODEL["max_position_embeddings"], seed)
    tok = load_tokenizer(root / "model")
    renderer = Renderer(tok, MAX_LENGTH, "all_assistant_messages", "chat_template")
    chats, pairs = mixed_chats(num_chats, seed), arithmetic_pairs(num_pairs, seed)
    problems = arithmetic_problems(num_problems, seed, max_operand=9)
    return Workload(
        model_dir=root / "model", tokenizer=tok, parameters=parameters,
        chats=chats, sft_rows=_rows(sft_row, renderer, chats),
        pairs=pairs, pair_rows=_rows(pair_row, renderer, pairs),
        problems=problems, problem_rows=_rows(problem_row, renderer, problems),
        stop=stop_sequences(tok, "chat_template"), config={"num_chats": num_chats, "seed": seed, **MODEL},
    )
