"""The `backend` resource: which training backend a run uses is run config, so the same
recipe job runs locally or on the Tinker service without code changes:

    resources:
      backend:
        config:
          kind: tinker            # local (default) | tinker
          tinker: {base_model: Qwen/Qwen3-8B}

Each implementation's settings sit under its own key; only the selected one is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from resources.backends.local.backend import LocalTorchBackend, LocalTorchSettings
from resources.backends.tinker.settings import TinkerSettings, read_pointer
from resources.backends.types import TrainingClient

if TYPE_CHECKING:
    from resources.backends.tinker.backend import TinkerBackend


class TrainingBackendResource(ConfigurableResource):
    kind: Literal["local", "tinker"] = Field(default="local", description="local: PyTorch in this process; tinker: the Tinker service (needs TINKER_API_KEY)")
    local: LocalTorchSettings = Field(default_factory=LocalTorchSettings)
    tinker: TinkerSettings = Field(default_factory=TinkerSettings)

    _impl: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Runs before the first step, so a missing TINKER_API_KEY fails the run at once."""
        if self.kind == "tinker":
            self.selected().check_credentials()

    def selected(self) -> LocalTorchBackend | TinkerBackend:
        if self._impl is None:
            self._impl = self._new_tinker() if self.kind == "tinker" else LocalTorchBackend(**self.local.model_dump())
        return self._impl

    def tinker_backend(self) -> TinkerBackend:
        return self.selected() if self.kind == "tinker" else self._new_tinker()

    def _new_tinker(self) -> TinkerBackend:
        """The Tinker SDK (seconds to import) is loaded only by a run that uses it."""
        from resources.backends.tinker.backend import TinkerBackend

        return TinkerBackend(**self.tinker.model_dump())

    def identity(self) -> dict[str, Any]:
        return self.selected().identity()

    def create_training_client(self, base_model: Path, lora_rank: int = 0, seed: int = 0) -> TrainingClient:
        return self.selected().create_training_client(base_model, lora_rank, seed)

    def export_model(self, model_dir: Path, out: Path) -> dict[str, Any]:
        """Copy a checkpoint's model dir for the registry. A Tinker checkpoint (whichever
        backend this run selected) also gets its HF-format weights downloaded."""
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        if read_pointer(model_dir) is None:
            return {}
        return {"downloaded_weights": self.tinker_backend().export_weights(model_dir, out)}
