"""TinkerBackend: the training-backend port on the Tinker service through the `tinker` SDK.

The recipes hand every backend a local model directory: the base model (its tokenizer is
what the data were tokenized with) or a checkpoint. On Tinker the weights live on the
service, so a checkpoint directory holds a pointer file (`tinker_checkpoint.json`: the
`tinker://` paths of the training state, the sampler weights and, when exported, the
HF-format weights) next to the tokenizer. A pointer directory is a valid starting model for
the next recipe: training continues from its state, sampling uses its sampler weights.

Tinker trains LoRA adapters only: a recipe that asks for a full fine-tune (`lora_rank` 0)
trains a LoRA of `full_finetune_lora_rank` here (recorded in identity()). Clients are made
lazily, so an evaluation client never starts a training run.

The API key is read from TINKER_API_KEY when a client is first needed and handed to the SDK;
it is never stored on the resource, logged, or written into identity() or a pointer file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import tinker
import torch
from dagster import ConfigurableResource
from pydantic import PrivateAttr

from resources.hf_io import load_tokenizer
from resources.backends.tinker.retries import BackendAuthError, Failure, RetryPolicy, resolve, resolve_all
from resources.backends.tinker.convert import (
    from_prompt_logprobs,
    from_tinker_output,
    from_tinker_sequence,
    to_tinker_datum,
    to_tinker_sampling,
)
from resources.backends.tinker.settings import POINTER_FILE, TinkerSettings, read_pointer
from resources.backends.types import (
    AdamParams,
    CustomLossFn,
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SamplingParams,
)

API_KEY_ENV = "TINKER_API_KEY"
AUTH_HINT = f"check {API_KEY_ENV} (a key from the Tinker console)"


class TinkerBackend(ConfigurableResource, TinkerSettings):
    """Trains on the Tinker service."""

    _service: Any = PrivateAttr(default=None)

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "tinker",
            "base_url": self.base_url or "default",
            "base_model": self.base_model,
            "full_finetune_lora_rank": self.full_finetune_lora_rank,
            "tinker": tinker.__version__,
        }

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.retry_base_delay_s, self.retry_max_delay_s, self.call_deadline_s)

    def check_credentials(self) -> None:
        """Fail fast, before any work, when no key is configured."""
        if not os.environ.get(API_KEY_ENV):
            raise BackendAuthError(f"the Tinker backend needs an API key: set {API_KEY_ENV} in the environment "
                                   "(it is read from there only and never recorded)")

    def api_key(self) -> str:
        self.check_credentials()
        return os.environ[API_KEY_ENV]

    def service(self) -> tinker.ServiceClient:
        if self._service is None:
            self._service = tinker.ServiceClient(api_key=self.api_key(), base_url=self.base_url or None)
        return self._service

    def call(self, submit: Callable[[], Any], what: str) -> Any:
        return resolve(submit, what, self.policy(), classify, AUTH_HINT)

    def call_all(self, submits: list[Callable[[], Any]], what: str) -> list[Any]:
        return resolve_all(submits, what, self.policy(), classify, AUTH_HINT)

    def model_name(self, model_dir: Path) -> str:
        return self.base_model or str(model_dir)

    def creating(self, submit: Callable[[], Any], what: str, model: str) -> Any:
        """Create a client; a model the service does not know fails with the list it serves."""
        try:
            return self.call(submit, what)
        except (tinker.BadRequestError, tinker.NotFoundError) as e:
            capabilities = self.call(lambda: self.service().get_server_capabilities(), "get_server_capabilities")
            served = [m.model_name for m in capabilities.supported_models if m.model_name]
            raise ValueError(f"{what}: Tinker could not serve model {model!r} ({e}); it serves {served}; "
                             "set the backend's tinker.base_model") from e

    def create_training_client(self, base_model: Path, lora_rank: int = 0, seed: int = 0) -> TinkerTrainingClient:
        return TinkerTrainingClient(self, Path(base_model), lora_rank, seed)

    def export_weights(self, model_dir: Path, out: Path) -> list[str]:
        """Download a pointer dir's HF-format weights (saved by the service at checkpoint
        time) into `out`; returns the file names. Nothing to do without exported weights."""
        pointer = read_pointer(model_dir)
        if not pointer or not pointer.get("hf_weights_path"):
            return []
        rest = tinker.RestClient(api_key=self.api_key(), base_url=self.base_url or None)
        urls = self.call(lambda: rest.get_external_weights_urls(pointer["hf_weights_path"]), "get_external_weights_urls").urls
        for name, url in sorted(urls.items()):
            target = (out / name).resolve()
            if not target.is_relative_to(out.resolve()):
                raise ValueError(f"Tinker export lists a file outside the checkpoint: {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=self.call_deadline_s) as response, open(target, "wb") as f:
                shutil.copyfileobj(response, f)
        return sorted(urls)


def classify(error: BaseException) -> Failure:
    if isinstance(error, (tinker.AuthenticationError, tinker.PermissionDeniedError)):
        return Failure.AUTH
    if isinstance(error, (tinker.APIConnectionError, tinker.RateLimitError, tinker.InternalServerError, TimeoutError)):
        return Failure.TRANSIENT  # APITimeoutError is an APIConnectionError
    if isinstance(error, tinker.APIStatusError) and (error.status_code == 429 or error.status_code >= 500):
        return Failure.TRANSIENT
    return Failure.FATAL


def _checkpoint_name(path: Path) -> str:
    """Tinker checkpoint names are per training run; a random suffix keeps re-saves apart."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).name).strip("-") or "checkpoint"
    return f"{label}-{uuid.uuid4().hex[:10]}"


class TinkerTrainingClient:
    def __init__(self, backend: TinkerBackend, model_dir: Path, lora_rank: int, seed: int) -> None:
        self.backend, self.seed = backend, seed
        backend.service()  # credentials are checked here, before any work
        self.tokenizer = load_tokenizer(model_dir)
        self.pointer = read_pointer(model_dir)
        if self.pointer:
            self.base_model, saved_rank = self.pointer["base_model"], self.pointer["lora_rank"]
            if lora_rank and lora_rank != saved_rank:
                raise ValueError(f"{model_dir} is a Tinker checkpoint with LoRA rank {saved_rank}; training continues "
                                 f"from it at that rank, so set lora_rank to {saved_rank} (or 0), not {lora_rank}")
            self.lora_rank = saved_rank
        else:
            self.base_model = backend.model_name(model_dir)
            self.lora_rank = lora_rank or backend.full_finetune_lora_rank
        self._trainer: tinker.TrainingClient | None = None
        self._sampler: tinker.SamplingClient | None = None

    # -- clients ---------------------------------------------------------------------------

    def trainer(self) -> tinker.TrainingClient:
        if self._trainer is None:
            service = self.backend.service()
            if self.pointer:
                path = self.pointer["state_path"]
                self._trainer = self.backend.creating(lambda: service.create_training_client_from_state(path),
                                                      "create_training_client_from_state", self.base_model)
            else:
                if self.lora_rank < 1:
                    raise ValueError("Tinker trains LoRA adapters only: set lora_rank or full_finetune_lora_rank > 0")
                self._trainer = self.backend.creating(
                    lambda: service.create_lora_training_client(base_model=self.base_model, rank=self.lora_rank, seed=self.seed),
                    "create_lora_training_client", self.base_model)
        return self._trainer

    def sampler(self) -> tinker.SamplingClient:
        """The current weights: a snapshot of the training run once it exists (refreshed
        after every optimizer step or load), else the checkpoint's or the base model's."""
        if self._sampler is None:
            service = self.backend.service()
            if self._trainer is not None:
                trainer = self._trainer
                submit = lambda: trainer.save_weights_and_get_sampling_client()  # noqa: E731
            elif self.pointer:
                submit = lambda: service.create_sampling_client(model_path=self.pointer["sampler_path"])  # noqa: E731
            else:
                submit = lambda: service.create_sampling_client(base_model=self.base_model)  # noqa: E731
            self._sampler = self.backend.creating(submit, "create_sampling_client", self.base_model)
        return self._sampler

    # -- training --------------------------------------------------------------------------

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        batch = [to_tinker_datum(d, loss_fn) for d in data]
        trainer = self.trainer()
        out = self.backend.call(lambda: trainer.forward_backward(batch, loss_fn, loss_fn_config), "forward_backward")
        return from_tinker_output(out)

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        """The SDK computes log-probs on the service, calls the loss here with them, and
        sends the gradient back; our loss sees our Datums (with every per-token input)."""
        batch = [to_tinker_datum(d, "custom") for d in data]

        def tinker_loss(_batch: list[tinker.types.Datum], logprobs: list[torch.Tensor]):
            return fn(data, logprobs)

        trainer = self.trainer()
        out = self.backend.call(lambda: trainer.forward_backward_custom(batch, tinker_loss), "forward_backward_custom")
        return from_tinker_output(out)

    def optim_step(self, adam_params: AdamParams) -> dict[str, float]:
        params = tinker.types.AdamParams(**adam_params.model_dump())
        trainer = self.trainer()
        out = self.backend.call(lambda: trainer.optim_step(params), "optim_step")
        self._sampler = None
        return dict(out.metrics or {})

    # -- sampling --------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], num_samples: int, sampling_params: SamplingParams) -> list[list[SampledSequence]]:
        sampler, params = self.sampler(), to_tinker_sampling(sampling_params)
        submits = [lambda p=p: sampler.sample(prompt=tinker.types.ModelInput.from_ints(list(p)), num_samples=num_samples,
                                              sampling_params=params) for p in prompts]
        responses = self.backend.call_all(submits, "sample")
        return [[from_tinker_sequence(s) for s in r.sequences] for r in responses]

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        sampler = self.sampler()
        submits = [lambda s=s: sampler.compute_logprobs(tinker.types.ModelInput.from_ints(list(s))) for s in sequences]
        return [from_prompt_logprobs(list(s), lps) for s, lps in zip(sequences, self.backend.call_all(submits, "compute_logprobs"))]

    # -- state -----------------------------------------------------------------------------

    def _pointer(self, **paths: str) -> dict:
        return {"base_model": self.base_model, "lora_rank": self.lora_rank, "tinker": tinker.__version__, **paths}

    def _save_state_path(self, path: Path) -> str:
        trainer, name = self.trainer(), _checkpoint_name(path)
        return self.backend.call(lambda: trainer.save_state(name), "save_state").path

    def save_state(self, path: Path) -> None:
        """Weights and optimizer state stay on the service; the dir records where."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / POINTER_FILE).write_text(json.dumps(self._pointer(state_path=self._save_state_path(path)), indent=1, sort_keys=True))

    def load_state(self, path: Path, with_optimizer: bool = True) -> None:
        pointer = read_pointer(Path(path))
        if pointer is None:
            raise FileNotFoundError(f"{path} has no {POINTER_FILE}: not a Tinker checkpoint")
        service, state = self.backend.service(), pointer["state_path"]
        create = service.create_training_client_from_state_with_optimizer if with_optimizer else service.create_training_client_from_state
        self._trainer = self.backend.call(lambda: create(state), "load_state")
        self._sampler = None

    def save_weights_for_sampler(self, path: Path) -> None:
        """Sampler weights, the training state (so the next recipe can continue from here),
        HF-format weights when enabled, and the tokenizer, which every later stage reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        trainer, name = self.trainer(), _checkpoint_name(path)
        paths = {"sampler_path": self.backend.call(lambda: trainer.save_weights_for_sampler(name), "save_weights_for_sampler").path,
                 "state_path": self._save_state_path(path)}
        if self.backend.export_hf_weights:
            paths["hf_weights_path"] = self.backend.call(lambda: trainer.save_weights_external(name), "save_weights_external").path
        (path / POINTER_FILE).write_text(json.dumps(self._pointer(**paths), indent=1, sort_keys=True))
        self.tokenizer.save_pretrained(path)
