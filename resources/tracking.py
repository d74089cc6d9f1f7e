"""Optional experiment-tracking sinks: MLflow and TensorBoard. Both are off by default and
turned on per run by run config:

    resources:
      tracking:
        config: {mlflow: true, tensorboard: true}

Each trained checkpoint becomes one MLflow run (params = the resolved training config,
per-step metrics from metrics.jsonl, the checkpoint dir and plots as artifacts, tags with
the fingerprint and upstream data versions) and one TensorBoard run of scalars. Sinks read
the stored artifact rather than hooking the loop, so a checkpoint trained before a sink was
turned on is logged on its next (cached) materialization, and one fingerprint is logged once.
Registering the checkpoint tags its MLflow run with the registry version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from resources.store.artifact_store import ArtifactRef
from resources.store.home import crucible_home
from resources.store.jsonl import read_jsonl

FINGERPRINT_TAG = "crucible.fingerprint"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def numeric_rows(ref: ArtifactRef) -> list[dict[str, float]]:
    """Per-step numbers of a checkpoint's metrics.jsonl, keyed by metric name."""
    return [{k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in read_jsonl(ref.dir / "metrics.jsonl")]


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TrackingResource(ConfigurableResource):
    mlflow: bool = Field(default=False, description="log each trained checkpoint as an MLflow run")
    mlflow_tracking_uri: str = Field(default="", description="MLflow tracking URI; '' = the local file store "
                                                             "$CRUCIBLE_HOME/mlruns")
    mlflow_experiment: str = Field(default="crucible", description="MLflow experiment the runs go to")
    tensorboard: bool = Field(default=False, description="write each trained checkpoint's per-step scalars for TensorBoard")
    tensorboard_dir: str = Field(default="", description="TensorBoard log root; '' = $CRUCIBLE_HOME/tensorboard")

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or (crucible_home() / "mlruns").as_uri()

    def record_checkpoint(self, ref: ArtifactRef, manifest: dict, log=print) -> None:
        """Logs a checkpoint artifact to every enabled sink that does not have it yet."""
        if self.mlflow:
            run_id = self._mlflow_record(ref, manifest)
            log(f"MLflow run {run_id} ({self.tracking_uri()}, experiment {self.mlflow_experiment}) for {ref.key}")
        if self.tensorboard:
            log(f"TensorBoard scalars for {ref.key} in {self._tensorboard_record(ref)}")

    def link_registration(self, checkpoint: ArtifactRef, entry: dict, model: str) -> None:
        """Tags the checkpoint's MLflow run with the registry version that now serves it."""
        if not self.mlflow:
            return
        client, experiment_id = self._mlflow_client()
        run = self._find_run(client, experiment_id, checkpoint.fingerprint)
        if run is not None:
            client.set_tag(run.info.run_id, "crucible.registry_version", f"{model}:{entry['version']}")
            client.set_tag(run.info.run_id, "crucible.registered_model_path", entry["path"])

    def _mlflow_client(self) -> tuple[Any, str]:
        uri = self.tracking_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store only on request; a local store is what this sink promises
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.mlflow_experiment)
        return client, experiment_id

    @staticmethod
    def _find_run(client, experiment_id: str, fingerprint: str):
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'", max_results=1)
        return runs[0] if runs else None

    def _mlflow_record(self, ref: ArtifactRef, manifest: dict) -> str:
        from mlflow.entities import Metric, Param

        client, experiment_id = self._mlflow_client()
        if (existing := self._find_run(client, experiment_id, ref.fingerprint)) is not None:
            return existing.info.run_id
        tags = {FINGERPRINT_TAG: ref.fingerprint, "crucible.asset_key": ref.key, "crucible.data_version": ref.content_hash,
                "crucible.dagster_run_id": manifest.get("run_id", ""),
                **{f"crucible.upstream.{u['key']}": u["content_hash"] for u in manifest.get("upstream", [])}}
        run = client.create_run(experiment_id, run_name=f"{ref.key}@{ref.content_hash[:12]}", tags=tags)
        run_id = run.info.run_id
        created_ms = int(manifest.get("created_at", 0) * 1000)
        metrics = [Metric(k, v, created_ms, int(r["step"])) for r in numeric_rows(ref) for k, v in r.items() if k != "step"]
        params = [Param(k, v) for k, v in flat_params(manifest.get("config", {})).items()]
        client.log_batch(run_id, params=params)
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + METRICS_PER_BATCH])
        client.log_artifacts(run_id, str(ref.dir / "model"), "checkpoint/model")
        for name in ["metrics.jsonl", *manifest.get("summary", {}).get("plots", [])]:
            client.log_artifact(run_id, str(ref.dir / name), "checkpoint")
        client.set_terminated(run_id)
        return run_id

    def _tensorboard_record(self, ref: ArtifactRef) -> Path:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(self.tensorboard_dir).expanduser() if self.tensorboard_dir else crucible_home() / "tensorboard"
        final = root / ref.key / ref.fingerprint
        if final.exists():
            return final
        tmp = final.with_name(f".tmp_{ref.fingerprint}")
        shutil.rmtree(tmp, ignore_errors=True)
        with SummaryWriter(log_dir=str(tmp)) as writer:
            for r in numeric_rows(ref):
                for k, v in r.items():
                    if k != "step":
                        writer.add_scalar(k, v, int(r["step"]))
        os.rename(tmp, final)
        return final
