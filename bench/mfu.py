"""MFU of our SFT row: training FLOP/s over the measured matmul peak of the precision our
backend picked. FLOPs per token = 6 x parameters (forward and backward of every weight,
the tied LM head included) + 12 x layers x hidden x sequence length (attention scores and
values, forward and backward, as in the PaLM paper's MFU)."""

from __future__ import annotations

from bench.result import Row
from resources.backends.local.backend import LocalTorchBackend


def flops_per_token(parameters: int, layers: int, hidden: int, mean_length: float) -> float:
    return 6 * parameters + 12 * layers * hidden * mean_length


def mfu_rows(sft: Row, w, machine: dict) -> list[Row]:
    layout = w.model_layout()
    # the model reads each trained sequence less its last token (inputs predict the next one)
    inputs = [len(r["tokens"]) - 1 for r in w.sft_rows[: sft.details["steps"] * sft.details["batch"]]]
    per_token = flops_per_token(w.parameters, layout["num_layers"], layout["hidden_size"], sum(inputs) / len(inputs))
    precision = LocalTorchBackend().resolved_precision()
    peak = machine[f"peak_{precision}_flops"]
    achieved = sft.details["ours tokens/s"] * sum(inputs) / sft.details["real tokens per rep"] * per_token
    details = {"precision used": precision, "training GFLOP/s": achieved / 1e9, "peak GFLOP/s of that precision": peak / 1e9,
               "peak fp32 GFLOP/s": machine["peak_fp32_flops"] / 1e9, "peak bf16 GFLOP/s": machine["peak_bf16_flops"] / 1e9,
               "parameters": w.parameters, "MFLOP per token": per_token / 1e6}
    return [Row("MFU", f"SFT training FLOP/s / measured {precision} matmul peak", achieved / peak, 0.5, details=details,
                profile=sft.profile, limit="matrix multiplies are about 70% of a step and, at this model's shapes (a few hundred packed "
                "rows by 384 or 1024), run at 60-90% of the 1024x1024 peak per thread (weight gradients slowest) and "
                "scale worse over two threads; the rest is elementwise work (RMSNorm, rotary, SiLU, residuals), "
                "masked attention (about 13%) and the optimizer, none of which counts as model FLOPs")]
