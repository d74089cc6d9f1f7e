"""Launching the supervised checkpoint's training as data-parallel processes: torchrun starts
`nproc_per_node` copies of crucible_assets/data_parallel_worker.py under Dagster Pipes, so
rank 0's logs and final summary stream back into the asset's step. The asset keeps its usual
store write around the launch: rank 0 writes the artifact into the staging dir it is given,
and the parent hashes, publishes and records the manifest exactly as for one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dagster import AssetExecutionContext, PipesSubprocessClient

from crucible_assets.supervised import SupervisedTrainConfig
from resources.backend import TrainingBackendResource


def launch_data_parallel(context: AssetExecutionContext, backend: TrainingBackendResource, config: SupervisedTrainConfig,
                         tokenized_dir: Path, base_model_dir: Path, out: Path, work: Path) -> dict:
    """Returns the checkpoint summary rank 0 reported."""
    if backend.kind != "local":
        raise ValueError(f"{context.asset_key.to_user_string()} config: nproc_per_node > 1 trains with the local "
                         f"backend's processes; the {backend.kind} backend distributes training itself")
    spec = {"config": config.model_dump(), "local": backend.local.model_dump(), "tokenized": str(tokenized_dir),
            "base_model": str(base_model_dir), "out": str(out), "work": str(work)}
    # every rank reads the spec; Pipes' context goes to rank 0 only (one writer on the message channel)
    spec_path = work / "launch.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc_per_node}",
               "-m", "crucible_assets.data_parallel_worker", str(spec_path)]
    context.log.info(f"launching {' '.join(command)}")
    invocation = PipesSubprocessClient().run(context=context, command=command)
    summaries = invocation.get_custom_messages()
    if not summaries:
        raise RuntimeError("data-parallel training exited without reporting its checkpoint summary")
    return summaries[-1]
