"""Data-parallel training under torchrun. The checkpoint asset launches `nproc_per_node`
copies of this module's `main` under Dagster Pipes, so rank 0's logs and final summary
stream back into the asset's step. Each rank runs the algorithm's own `train` with a
DataParallelTrainingClient (resources/backends/local/data_parallel.py); rank 0 writes the
checkpoint into the staging dir it is given, and the parent hashes, publishes and records
the manifest exactly as for one process."""

from __future__ import annotations

import importlib
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import AssetExecutionContext, PipesSubprocessClient

from resources.store.artifact_store import ArtifactRef

if TYPE_CHECKING:
    from crucible_assets.train.algorithm import Algorithm
    from crucible_assets.train.loop import TrainConfig
    from resources.backends.resource import TrainingBackendResource


def launch_torchrun(context: AssetExecutionContext, backend: TrainingBackendResource, algorithm: Algorithm,
                    config: TrainConfig, inputs: dict[str, ArtifactRef], out: Path, work: Path) -> dict:
    """Returns the checkpoint summary rank 0 reported."""
    if backend.kind != "local":
        raise ValueError(f"{context.asset_key.to_user_string()} config: nproc_per_node > 1 trains with the local "
                         f"backend's processes; the {backend.kind} backend distributes training itself")
    spec = {"algorithm": algorithm.train.__module__, "config": config.model_dump(), "local": backend.local.model_dump(),
            "inputs": {s: ref.model_dump() for s, ref in inputs.items()}, "out": str(out), "work": str(work)}
    # every rank reads the spec; Pipes' context goes to rank 0 only (one writer on the message channel)
    spec_path = work / "launch.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc_per_node}",
               "-m", "crucible_assets.train.torchrun", str(spec_path)]
    context.log.info(f"launching {' '.join(command)}")
    invocation = PipesSubprocessClient().run(context=context, command=command)
    summaries = invocation.get_custom_messages()
    if not summaries:
        raise RuntimeError("data-parallel training exited without reporting its checkpoint summary")
    return summaries[-1]


def main(spec_path: str) -> None:
    """One rank: the same loop and step as in-process training on identical state."""
    import torch.distributed as dist
    from dagster_pipes import open_dagster_pipes

    from crucible_assets.train.algorithm import TrainingRun
    from crucible_assets.train.checkpoint import save_checkpoint
    from resources.backends.local.backend import LocalTorchBackend
    from resources.backends.local.data_parallel import DataParallelTrainingClient, init_process_group

    spec = json.loads(Path(spec_path).read_text())
    algorithm = importlib.import_module(spec["algorithm"]).ALGORITHM
    config = algorithm.train_config(**spec["config"])
    init_process_group(config.dist_backend)
    rank = dist.get_rank()
    with open_dagster_pipes() if rank == 0 else nullcontext() as pipes:
        log = pipes.log.info if pipes else (lambda _msg: None)
        inputs = {s: ArtifactRef.model_validate(ref) for s, ref in spec["inputs"].items()}
        backend = LocalTorchBackend(**spec["local"])
        client = backend.create_training_client(inputs["base_model"].dir, config.lora_rank, config.seed,
                                                client_cls=DataParallelTrainingClient)
        log(f"rank 0 of {client.world_size} ({dist.get_backend()}) on {client.device}")
        rows, telemetry = algorithm.train(TrainingRun(client, config, inputs, backend, Path(spec["work"]), log))
        if pipes:
            telemetry["world_size"] = client.world_size
            pipes.report_custom_message(save_checkpoint(client, Path(spec["out"]), rows, telemetry,
                                                        algorithm.loss_key, algorithm.eval_key))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
