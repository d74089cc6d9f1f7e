"""LocalTorchBackend: the resource that trains in this process with PyTorch. Resolving the
device and precision and stating the backend's identity (part of every training asset's
fingerprint) need no torch import on a CPU-only wheel once this machine's precision probe is
recorded, so a run of cache hits stays free of it; the client
(resources/backends/local/client.py) is imported when one is made."""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dagster import Config, ConfigurableResource
from pydantic import Field, NonNegativeInt

from resources.backends.local.precision_probe import probed

if TYPE_CHECKING:
    from resources.backends.local.client import LocalTrainingClient


class LocalTorchSettings(Config):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="bf16: autocast, fp32 master weights. auto: bf16 on a CUDA GPU that supports it; "
                                    "on a CPU the faster of the two, measured once per machine")
    micro_batch_size: NonNegativeInt = Field(default=0, description="split forward/backward into chunks of this many sequences; 0 = whole batch")
    packing: bool = Field(default=True, description="pack several sequences per row (block-diagonal attention) instead of padding each")
    pack_length: NonNegativeInt = Field(default=0, description="row length when packing; 0 = chosen per batch by a compute estimate (1-4x the longest sequence)")
    threads: NonNegativeInt = Field(default=0, description="CPU threads for torch's kernels; 0 = torch's default (one per core). "
                                                          "Results can differ in the last bits between thread counts")
    trust_remote_code: bool = False


@functools.cache
def torch_version() -> str:
    """The installed torch's version from its wheel metadata, without importing it (for the
    CPU wheel the same string as torch.__version__, so fingerprints did not change)."""
    return version("torch")


def cuda_available() -> bool:
    """A CPU-only wheel (`+cpu`) has no CUDA: answered without importing torch (about 2 s)."""
    if torch_version().endswith("+cpu"):
        return False
    import torch

    return torch.cuda.is_available()


class LocalTorchBackend(ConfigurableResource, LocalTorchSettings):
    """Trains in this process with PyTorch."""

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if cuda_available() else "cpu"

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        if self.resolved_device() == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return probed(self.threads)["choice"]

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "local_torch",
            "device": self.resolved_device(),
            "precision": self.resolved_precision(),
            # auto on a CPU: the probe's rates that made the choice (resources/backends/local/precision_probe.py)
            **({"precision_probe": probed(self.threads)["rates_gflops"]}
               if self.precision == "auto" and self.resolved_device() == "cpu" else {}),
            "torch": torch_version(),
            "optimizer": "adamw_fused",  # the kernel is part of the numbers (before it: a per-tensor loop)
            # so is the sampler: the lean decode step, inverse-CDF draws, finished rows leaving the batch (decode.py)
            "sampler": "lean_step_v1",
            "packing": self.packing,
            "pack_length": self.pack_length,
            # a pinned thread count is an input of the numbers; unpinned (0) leaves earlier fingerprints as they were
            **({"threads": self.threads} if self.threads else {}),
        }

    def create_training_client(self, base_model: Path, lora_rank: int = 0, seed: int = 0,
                               client_cls: type[LocalTrainingClient] | None = None) -> LocalTrainingClient:
        """`client_cls`: a LocalTrainingClient subclass, e.g. one rank of data-parallel training."""
        from resources.backends.local.client import LocalTrainingClient

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return (client_cls or LocalTrainingClient)(
            base_model,
            lora_rank=lora_rank,
            seed=seed,
            device=self.resolved_device(),
            bf16=self.resolved_precision() == "bf16",
            micro_batch_size=self.micro_batch_size,
            packing=self.packing,
            pack_length=self.pack_length,
            trust_remote_code=self.trust_remote_code,
        )
