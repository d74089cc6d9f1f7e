"""Conversions between our port's types and the `tinker` SDK's, in one place so the
conventions (shift by one, the sampler's leading `None`, the inputs each loss takes) are
decided once."""

from __future__ import annotations

import torch
from tinker import types

from resources.backends.types import Datum, ForwardBackwardOutput, SampledSequence, SamplingParams

# The per-token inputs each built-in loss takes on the service (Tinker's loss docs); we send
# exactly these so the service never sees a field it does not define for that loss.
LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "custom": ("target_tokens", "weights"),  # what forward_backward_custom sends to the server
}


def tensor(name: str, values: list) -> types.TensorData:
    dtype = "int64" if name == "target_tokens" else "float32"
    return types.TensorData(data=[int(v) if dtype == "int64" else float(v) for v in values], dtype=dtype, shape=[len(values)])


def to_tinker_datum(datum: Datum, loss_fn: str) -> types.Datum:
    keys = LOSS_INPUTS[loss_fn]
    missing = [k for k in keys if k not in datum.loss_fn_inputs and k != "weights"]
    if missing:
        raise ValueError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {missing}")
    inputs = {k: tensor(k, datum.loss_fn_inputs[k]) for k in keys if k in datum.loss_fn_inputs}
    return types.Datum(model_input=types.ModelInput.from_ints(list(datum.model_input)), loss_fn_inputs=inputs)


def from_tinker_output(output: types.ForwardBackwardOutput) -> ForwardBackwardOutput:
    outputs = [{"logprobs": o["logprobs"].to_torch().to(torch.float32)} for o in output.loss_fn_outputs]
    return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=dict(output.metrics))


def to_tinker_sampling(params: SamplingParams) -> types.SamplingParams:
    """Greedy is temperature 0 on both sides. Our empty `stop` means "end-of-sequence
    only"; Tinker reads `[]` as "no stop at all", so it becomes `None`."""
    return types.SamplingParams(max_tokens=params.max_tokens, temperature=max(params.temperature, 0.0),
                                top_p=params.top_p, stop=list(params.stop) or None, seed=params.seed)


def from_tinker_sequence(seq: types.SampledSequence) -> SampledSequence:
    if seq.logprobs is None:
        raise ValueError("the Tinker sampler returned no log-probs for a sampled sequence")
    return SampledSequence(tokens=list(seq.tokens), logprobs=[float(x) for x in seq.logprobs], stop_reason=seq.stop_reason)


def from_prompt_logprobs(tokens: list[int], logprobs: list[float | None]) -> list[float]:
    """Tinker scores every prompt position and puts `None` first (nothing precedes token 0);
    our convention is len(seq) - 1 values aligned with seq[1:]."""
    if len(logprobs) != len(tokens) or logprobs[0] is not None:
        raise ValueError(f"unexpected Tinker prompt log-probs: {len(logprobs)} values for {len(tokens)} tokens, "
                         f"first {logprobs[:1]!r} (expected None)")
    rest = logprobs[1:]
    if any(x is None for x in rest):
        raise ValueError("the Tinker sampler left a prompt position after the first unscored")
    return [float(x) for x in rest]
