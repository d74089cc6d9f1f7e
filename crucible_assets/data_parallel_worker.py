"""One rank of data-parallel supervised training, started by torchrun
(crucible_assets/data_parallel.py): the same loop and step as in-process training, with a
DataParallelTrainingClient; rank 0 logs through Dagster Pipes and writes the checkpoint."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist
from dagster_pipes import open_dagster_pipes

from crucible_assets.stages import save_checkpoint
from crucible_assets.supervised import SupervisedTrainConfig, read_pairs, train_supervised
from resources.data_parallel import DataParallelTrainingClient, init_process_group
from resources.local_torch import LocalTorchBackend


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    config = SupervisedTrainConfig.model_validate(spec["config"])
    init_process_group(config.dist_backend)
    rank = dist.get_rank()
    with open_dagster_pipes() if rank == 0 else nullcontext() as pipes:
        log = pipes.log.info if pipes else (lambda _msg: None)
        tokenized = Path(spec["tokenized"])
        client = LocalTorchBackend(**spec["local"]).create_training_client(
            Path(spec["base_model"]), config.lora_rank, config.seed, client_cls=DataParallelTrainingClient)
        log(f"rank 0 of {client.world_size} ({dist.get_backend()}) on {client.device}")
        rows, telemetry = train_supervised(client, read_pairs(tokenized, "train"), read_pairs(tokenized, "test"),
                                           config, Path(spec["work"]), log)
        if pipes:
            telemetry["world_size"] = client.world_size
            pipes.report_custom_message(save_checkpoint(client, Path(spec["out"]), rows, telemetry, "train_mean_nll", "test/nll"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
