"""`precision: auto` on a CPU decides by measurement, not by the flags: a CPU can list
`avx512_bf16` and still run bf16 matmuls at half its fp32 rate, and an AVX2-only CPU emulates
bf16 at about 1/160 of fp32. The probe times forward+backward of a linear at the default
tiny Llama's MLP shape under each precision, once per machine (CPU model, torch, threads),
and records the rates in $CRUCIBLE_HOME/machine/precision_probe.json so that later runs, and
runs of cache hits, read the decision without importing torch. A probe taken while the
machine was busy can choose wrong: delete the file to measure again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from resources.backends.local.cpu import cpu_model
from resources.store.home import crucible_home

# the default tiny Llama's MLP up-projection (hidden 256 -> 688) over a 512-token micro batch
TOKENS, IN_FEATURES, OUT_FEATURES = 512, 256, 688
SECONDS_PER_PRECISION = 0.4
# bf16 must win clearly: at equal speed fp32's numbers are the safer ones
BF16_MIN_SPEEDUP = 1.1


def measure_rates(seconds: float = SECONDS_PER_PRECISION, rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of forward+backward (6 * tokens * in * out FLOPs) in fp32 and under bf16
    autocast: `rounds` alternating timings of about seconds/rounds each after a warm-up call,
    the best of each kept, so a burst of other load during one timing does not decide."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, IN_FEATURES, generator=gen)
    linear = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    flops = 6 * TOKENS * IN_FEATURES * OUT_FEATURES

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = linear(x.requires_grad_())
        y.float().sum().backward()

    precisions = {"fp32": False, "bf16": True}
    for bf16 in precisions.values():
        step(bf16)
    rates = dict.fromkeys(precisions, 0.0)
    for _ in range(rounds):
        for name, bf16 in precisions.items():
            calls, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / rounds or calls < 2:
                step(bf16)
                calls += 1
            rates[name] = max(rates[name], round(calls * flops / elapsed / 1e9, 1))
    return rates


def choose(rates: dict[str, float]) -> str:
    return "bf16" if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"] else "fp32"


def machine_key(threads: int) -> str:
    """Rates hold for one CPU model, torch build and thread count (0 = torch's default)."""
    from resources.backends.local.backend import torch_version

    return f"{cpu_model()} | torch {torch_version()} | threads {threads or os.cpu_count()}"


def probe_file() -> Path:
    return crucible_home() / "machine" / "precision_probe.json"


def probed(threads: int) -> dict:
    """This machine's recorded probe ({"rates", "choice", "machine"}), measuring it on first
    use. The file keeps one entry per machine key, written atomically, so a shared home on
    several machine types keeps each one's answer."""
    path, key = probe_file(), machine_key(threads)
    entries = json.loads(path.read_text()) if path.exists() else {}
    if key not in entries:
        if threads:
            import torch

            torch.set_num_threads(threads)
        rates = measure_rates()
        entries[key] = {"machine": key, "rates_gflops": rates, "choice": choose(rates)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(tmp, path)
    return entries[key]
