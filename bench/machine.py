"""What the numbers were measured on: CPU, cores, library versions, threads, and the
measured matmul peak of each precision (the denominator of MFU)."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version

import torch

from resources.backends.local.cpu import cpu_has_native_bf16, cpu_model


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square matmul over repeated timed bursts (after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(peak_seconds: float) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        **{p: _version(p) for p in ("torch", "transformers", "trl", "datasets", "dagster")},
        "peak_fp32_flops": matmul_peak(torch.float32, seconds=peak_seconds),
        "peak_bf16_flops": matmul_peak(torch.bfloat16, seconds=peak_seconds),
    }
