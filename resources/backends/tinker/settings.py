"""What the backend resource needs of Tinker without importing its SDK (about 2 s): the
settings a run config gives it and the pointer file that marks a Tinker checkpoint dir."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import Config
from pydantic import Field

POINTER_FILE = "tinker_checkpoint.json"


class TinkerSettings(Config):
    base_url: str = Field(default="", description="Tinker API URL; empty = the SDK's default (TINKER_BASE_URL, else production)")
    base_model: str = Field(default="", description="the Tinker model name to train, e.g. Qwen/Qwen3-8B: the model whose tokenizer "
                                                    "the recipe's base_model dir holds; empty = that dir's path")
    full_finetune_lora_rank: int = Field(default=32, description="LoRA rank used when a recipe asks for lora_rank 0 (Tinker trains LoRA only)")
    export_hf_weights: bool = Field(default=True, description="also save HF-format weights with each checkpoint so the registry can download them")
    max_attempts: int = Field(default=6, description="attempts per request on transient errors (connection, 429, 5xx, time-out)")
    retry_base_delay_s: float = Field(default=1.0, description="first backoff; doubles per attempt")
    retry_max_delay_s: float = Field(default=30.0, description="longest single backoff")
    call_deadline_s: float = Field(default=900.0, description="longest wait for one call (a batch of samples included), retries included")


def read_pointer(model_dir: Path) -> dict | None:
    path = Path(model_dir) / POINTER_FILE
    return json.loads(path.read_text()) if path.exists() else None
