"""Data-parallel training on the local backend: one LocalTrainingClient per process, started
by torchrun, with gradients all-reduced by torch.distributed DDP (gloo on CPU, NCCL on GPU).

Every rank runs the same training loop on the same global batch; the client keeps only its
shard (every world_size-th datum) for forward/backward. The supervised loss is a sum already
normalized by the global batch's weight, so the global gradient is the *sum* of the ranks'
gradients: DDP averages, hence the loss is scaled by world_size before backward. Metrics are
summed over ranks and per-datum outputs gathered back into the caller's order, so the loop
sees exactly what one process would report. Rank 0 alone writes saves and the artifact
(crucible_assets/train/loop.py, crucible_assets/train/torchrun.py).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from resources.backends.local.client import LocalTrainingClient
from resources.backends.types import CustomLossFn, Datum, ForwardBackwardOutput


def init_process_group(backend: str = "auto") -> None:
    """Joins the group torchrun described in the environment; one GPU per rank on CUDA."""
    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend if backend != "auto" else ("nccl" if cuda else "gloo"))


class DataParallelTrainingClient(LocalTrainingClient):
    """A LocalTrainingClient whose forward/backward covers this rank's shard of the batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._ddp: DistributedDataParallel | None = None

    def _module(self) -> torch.nn.Module:
        if not torch.is_grad_enabled():
            return self.model  # evaluation needs no gradient sync
        if self._ddp is None or self._ddp.module is not self.model:  # load_state may rebuild the model
            self._ddp = DistributedDataParallel(self.model)
        return self._ddp

    def _backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()  # DDP averages; the loss is a share of a global sum

    def _run(self, data: list[Datum], loss_of) -> ForwardBackwardOutput:
        if len(data) < self.world_size:
            raise ValueError(f"a batch of {len(data)} cannot be split over {self.world_size} processes; "
                             "raise batch_size or lower nproc_per_node")
        shard = super()._run(data[self.rank :: self.world_size], loss_of)
        keys = sorted(shard.metrics)
        totals = torch.tensor([shard.metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(totals)
        gathered: list[list[dict] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, shard.loss_fn_outputs)
        outputs = [gathered[i % self.world_size][i // self.world_size] for i in range(len(data))]
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=dict(zip(keys, totals.tolist())))

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        raise NotImplementedError("data-parallel training covers the built-in losses; custom (pairwise) losses "
                                  "see the whole batch and run in one process")
