"""Loading HF-format models and tokenizers the safe way: safetensors only, no remote code
unless the user asks for it, no network when the model is local."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class UnsafeWeightsError(RuntimeError):
    pass


def check_safetensors(model_dir: Path) -> None:
    if not model_dir.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) refuses pickles itself
    if not any(model_dir.glob("*.safetensors")):
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
        raise UnsafeWeightsError(
            f"{model_dir} has no .safetensors weights"
            + (f" (only pickle files {pickles}, which can run code when loaded)" if pickles else "")
            + "; convert it to safetensors first"
        )


def quiet_progress_bars() -> None:
    """transformers draws a bar for every model it loads or writes ("Loading weights", "Writing
    model shards"): several per run step, burying the run's own progress lines."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def load_model(
    model_dir: Path | str, device: str = "cpu", trust_remote_code: bool = False
) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    check_safetensors(Path(model_dir))
    quiet_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
        attn_implementation="sdpa",
    )
    return model.to(device)


def load_tokenizer(model_dir: Path | str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
