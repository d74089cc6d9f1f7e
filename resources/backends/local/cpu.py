"""What this CPU is, from /proc/cpuinfo: the precision choice, the bench's machine line and
the reproduce claim ("same machine type") all ask it."""

from __future__ import annotations

import os
import platform


def cpuinfo_field(name: str) -> str:
    """The first processor's value of `name` ("model name", "flags"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine_type() -> str:
    """What "same machine type" means for a bit-identical claim: architecture, CPU model, cores."""
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux); False where they cannot be read."""
    flags = cpuinfo_field("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags
