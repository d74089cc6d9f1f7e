"""The training-backend port, shaped like the Tinker SDK so recipes run unchanged on the
local PyTorch backend and on the Tinker service.

Datum convention: for a token sequence `seq`, `model_input = seq[:-1]` and
`target_tokens = seq[1:]`; every per-token input (`weights`, `logprobs`, `advantages`)
has the length of `model_input`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from pydantic import BaseModel

if TYPE_CHECKING:  # annotations only: the port's types load without torch
    import torch


@dataclass
class Datum:
    model_input: list[int]
    loss_fn_inputs: dict[str, list[float] | list[int]]

    def __post_init__(self) -> None:
        n = len(self.model_input)
        for name, values in self.loss_fn_inputs.items():
            if len(values) != n:
                raise ValueError(f"loss_fn_inputs[{name!r}] has length {len(values)}, model_input has {n}")

    @classmethod
    def from_sequence(cls, tokens: Sequence[int], weights: Sequence[float], **per_token: Sequence[float]) -> Datum:
        """Shift by one: weight i of `tokens` is the weight of predicting token i."""
        if len(tokens) < 2:
            raise ValueError("a training sequence needs at least two tokens")
        if len(weights) != len(tokens):
            raise ValueError(f"weights has length {len(weights)}, tokens has {len(tokens)}")
        inputs: dict[str, list] = {"target_tokens": list(tokens[1:]), "weights": list(weights[1:])}
        inputs.update({k: list(v[1:]) for k, v in per_token.items()})
        return cls(model_input=list(tokens[:-1]), loss_fn_inputs=inputs)


class AdamParams(BaseModel):
    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0 disables clipping


class SamplingParams(BaseModel):
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int = 0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" (eos or stop string) or "length"


@dataclass
class ForwardBackwardOutput:
    """Per-datum target log-probs (length of model_input) and summed loss metrics."""

    loss_fn_outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)


CustomLossFn = Callable[[list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]


class TrainingClient(Protocol):
    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> ForwardBackwardOutput: ...

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput: ...

    def optim_step(self, adam_params: AdamParams) -> dict[str, float]: ...

    def sample(
        self, prompts: list[list[int]], num_samples: int, sampling_params: SamplingParams
    ) -> list[list[SampledSequence]]: ...

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]: ...

    def save_state(self, path: Path) -> None: ...

    def load_state(self, path: Path, with_optimizer: bool = True) -> None: ...

    def save_weights_for_sampler(self, path: Path) -> None: ...


class TrainingBackend(Protocol):
    """A Dagster resource that creates training clients (Tinker's ServiceClient)."""

    def identity(self) -> dict[str, Any]: ...

    def create_training_client(self, base_model: Path, lora_rank: int, seed: int) -> TrainingClient: ...
