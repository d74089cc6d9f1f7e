"""An in-process stand-in for the Tinker service, so the Tinker backend is tested here
(the real service cannot be reached from this machine).

It replaces the SDK's client classes (`tinker.ServiceClient`, `tinker.RestClient`) with
doubles that keep the SDK's interface: the same method names and arguments, futures with
`.result(timeout)`, and real `tinker.types` objects in and out. Inputs are type-checked
(a plain list where the SDK takes a `ModelInput` is an error, as is a loss input the
service does not define for that loss). The models are LocalTrainingClient instances, so the
numbers are real. Faults are injected per method: SDK exceptions (401, 429, 5xx, connection
errors) or a request that never completes.
"""

from __future__ import annotations

import datetime
import time
import typing
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import tinker
from tinker import types

from resources.backends.local.client import LocalTrainingClient
from resources.backends.types import AdamParams, Datum, SamplingParams

HANG = "hang"  # a fault: the request never completes
LOSS_INPUTS = {  # what the service accepts per built-in loss: required, optional
    "cross_entropy": ({"target_tokens"}, {"weights"}),
    "importance_sampling": ({"target_tokens", "logprobs", "advantages"}, set()),
    "ppo": ({"target_tokens", "logprobs", "advantages"}, set()),
}


def status_error(cls: type[tinker.APIStatusError], status: int, message: str) -> tinker.APIStatusError:
    request = httpx.Request("POST", "https://tinker.invalid/api")
    return cls(message, response=httpx.Response(status, request=request), body=None)


def connection_error() -> tinker.APIConnectionError:
    return tinker.APIConnectionError(request=httpx.Request("POST", "https://tinker.invalid/api"))


class Future:
    """The SDK's APIFuture contract: `.result(timeout)` returns the value or raises."""

    def __init__(self, compute=None, error: BaseException | None = None, hang: bool = False) -> None:
        self.hang, self.error, self.value = hang, error, None
        if not hang and error is None:
            try:
                self.value = compute()
            except BaseException as e:  # noqa: BLE001 - delivered by result(), as the SDK does
                self.error = e

    def result(self, timeout: float | None = None):
        if self.hang:
            assert timeout is not None, "result() without a timeout on a stuck request would hang forever"
            time.sleep(timeout)
            raise TimeoutError()
        if self.error is not None:
            raise self.error
        return self.value


def expect(value, cls, what: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"stand-in: {what} must be {cls.__module__}.{cls.__qualname__}, got {type(value).__name__}")


def to_local(datum: types.Datum, loss_fn: str) -> Datum:
    expect(datum, types.Datum, "each datum")
    expect(datum.model_input, types.ModelInput, "Datum.model_input")
    required, optional = LOSS_INPUTS[loss_fn]
    keys = set(datum.loss_fn_inputs)
    if not required <= keys or keys - required - optional:
        raise status_error(tinker.BadRequestError, 400, f"loss {loss_fn!r} takes {sorted(required | optional)}, got {sorted(keys)}")
    for name, value in datum.loss_fn_inputs.items():
        expect(value, types.TensorData, f"loss_fn_inputs[{name!r}]")
    return Datum(model_input=datum.model_input.to_ints(), loss_fn_inputs={k: list(v.data) for k, v in datum.loss_fn_inputs.items()})


def to_output(out, extra_metrics: dict | None = None) -> types.ForwardBackwardOutput:
    """The service reports the loss's own metrics, not our local packing layout."""
    metrics = {k: float(v) for k, v in out.metrics.items() if not k.startswith("tokens:")}
    outputs = [{"logprobs": types.TensorData.from_torch(o["logprobs"].float())} for o in out.loss_fn_outputs]
    return types.ForwardBackwardOutput(loss_fn_output_type="TensorData", loss_fn_outputs=outputs, metrics=metrics | (extra_metrics or {}))


class TinkerStandIn:
    """The service: accepted API keys, served models, checkpoints by tinker:// path, faults."""

    def __init__(self, root: Path, api_key: str = "standin-key", models: dict[str, Path] | None = None) -> None:
        self.root, self.api_key, self.models = Path(root), api_key, dict(models or {})
        self.checkpoints: dict[str, tuple[Path, dict]] = {}  # tinker path -> (dir, run info)
        self.faults: dict[str, list] = {}
        self.calls: Counter = Counter()

    def install(self, monkeypatch) -> TinkerStandIn:
        monkeypatch.setattr(tinker, "ServiceClient", lambda *a, **kw: ServiceClient(self, *a, **kw))
        monkeypatch.setattr(tinker, "RestClient", lambda *a, **kw: RestClient(self, *a, **kw))
        return self

    def fail_next(self, method: str, *faults) -> None:
        """The next calls of `method` fail with these SDK exceptions (or HANG), in order."""
        self.faults.setdefault(method, []).extend(faults)

    def op(self, api_key: str | None, method: str, compute) -> Future:
        self.calls[method] += 1
        if api_key != self.api_key:
            return Future(error=status_error(tinker.AuthenticationError, 401, "invalid API key"))
        if self.faults.get(method):
            fault = self.faults[method].pop(0)
            return Future(hang=True) if fault == HANG else Future(error=fault)
        return Future(compute)

    def model_dir(self, name: str) -> Path:
        if name in self.models:
            return self.models[name]
        if Path(name).is_dir():  # the Tinker backend names a local base model by its path
            return Path(name)
        raise status_error(tinker.BadRequestError, 400, f"unknown base model {name!r}")

    def store(self, run: dict, kind: str, name: str) -> tuple[str, Path]:
        path = f"tinker://{run['run_id']}/{kind}/{name}"
        directory = self.root / run["run_id"] / kind / name
        directory.mkdir(parents=True)
        self.checkpoints[path] = (directory, run)
        return path, directory

    def lookup(self, path: str, kind: str) -> tuple[Path, dict]:
        if path not in self.checkpoints or f"/{kind}/" not in path:
            raise status_error(tinker.NotFoundError, 404, f"no {kind} checkpoint {path!r}")
        return self.checkpoints[path]


class ServiceClient:
    def __init__(self, service: TinkerStandIn, user_metadata=None, project_id=None, *, display_name=None,
                 base_url: str | None = None, api_key: str | None = None, **_kw) -> None:
        self.service, self.api_key, self.base_url = service, api_key, base_url

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        future = self.service.op(self.api_key, "get_server_capabilities", lambda: types.GetServerCapabilitiesResponse(
            supported_models=[types.SupportedModel(model_name=n) for n in self.service.models]))
        return future.result(timeout=0)

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None, **_kw) -> Future:
        def create():
            expect(base_model, str, "base_model")
            run = {"run_id": f"run-{uuid.uuid4().hex[:8]}", "base_model": base_model, "model_dir": self.service.model_dir(base_model),
                   "rank": rank, "seed": seed or 0}
            return TrainingClient(self, run)

        return self.service.op(self.api_key, "create_lora_training_client", create)

    def _from_state(self, method: str, path: str, with_optimizer: bool) -> Future:
        def create():
            directory, saved = self.service.lookup(path, "weights")
            client = TrainingClient(self, {**saved, "run_id": f"run-{uuid.uuid4().hex[:8]}"})
            client.local.load_state(directory, with_optimizer=with_optimizer)
            return client

        return self.service.op(self.api_key, method, create)

    def create_training_client_from_state(self, path: str, base_model: str | None = None, **_kw) -> Future:
        return self._from_state("create_training_client_from_state", path, False)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None, **_kw) -> Future:
        return self._from_state("create_training_client_from_state_with_optimizer", path, True)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None, **_kw) -> Future:
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")

        def create():
            directory = self.service.lookup(model_path, "sampler_weights")[0] if model_path else self.service.model_dir(base_model)
            return SamplingClient(self, directory)

        return self.service.op(self.api_key, "create_sampling_client", create)


class RestClient:
    def __init__(self, service: TinkerStandIn, _holder=None, *, base_url: str | None = None, api_key: str | None = None) -> None:
        self.service, self.api_key = service, api_key

    def get_external_weights_urls(self, tinker_path: str) -> Future:
        def urls():
            directory = self.service.lookup(tinker_path, "external_weights")[0]
            files = {str(p.relative_to(directory)): p.as_uri() for p in sorted(directory.rglob("*")) if p.is_file()}
            return types.ExternalWeightsUrlsResponse(urls=files, expires=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))

        return self.service.op(self.api_key, "get_external_weights_urls", urls)


class TrainingClient:
    """One LoRA training run on the stand-in; the model is a LocalTrainingClient."""

    def __init__(self, service_client: ServiceClient, run: dict) -> None:
        self.sc, self.run = service_client, run
        self.local = LocalTrainingClient(run["model_dir"], lora_rank=run["rank"], seed=run["seed"], device="cpu", bf16=False)

    def _op(self, method: str, compute) -> Future:
        return self.sc.service.op(self.sc.api_key, method, compute)

    def forward_backward(self, data: list[types.Datum], loss_fn: types.LossFnType, loss_fn_config=None) -> Future:
        def run():
            if loss_fn not in typing.get_args(types.LossFnType) or loss_fn not in LOSS_INPUTS:
                raise status_error(tinker.BadRequestError, 400, f"loss_fn {loss_fn!r} is not served by the stand-in")
            return to_output(self.local.forward_backward([to_local(d, loss_fn) for d in data], loss_fn, loss_fn_config))

        return self._op("forward_backward", run)

    def forward_backward_custom(self, data: list[types.Datum], loss_fn) -> Future:
        """As the SDK: log-probs from a forward pass, the loss called on the client's
        Datums, and the gradient of that loss applied; only target_tokens and weights are
        sent to the server."""
        def run():
            local = [to_local(d, "cross_entropy") for d in data]
            metrics: dict = {}

            def loss(_local, logprobs):
                value, m = loss_fn(data, logprobs)
                metrics.update(m)
                return value, {}

            return to_output(self.local.forward_backward_custom(local, loss), metrics)

        return self._op("forward_backward_custom", run)

    def optim_step(self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None) -> Future:
        params = optim_params or adam_params
        expect(params, types.AdamParams, "optim_step's params")
        return self._op("optim_step", lambda: types.OptimStepResponse(metrics=self.local.optim_step(AdamParams(**params.model_dump()))))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False, user_metadata=None) -> Future:
        def save():
            path, directory = self.sc.service.store(self.run, "weights", name)
            self.local.save_state(directory)
            return types.SaveWeightsResponse(path=path)

        return self._op("save_state", save)

    def _save_merged(self, method: str, kind: str, name: str, response):
        def save():
            path, directory = self.sc.service.store(self.run, kind, name)
            self.local.save_weights_for_sampler(directory)
            return response(path=path)

        return self._op(method, save)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None, user_metadata=None) -> Future:
        return self._save_merged("save_weights_for_sampler", "sampler_weights", name, types.SaveWeightsForSamplerResponse)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None, age_encryption_recipients=None) -> Future:
        return self._save_merged("save_weights_external", "external_weights", name, types.SaveWeightsExternalResponse)

    def save_weights_and_get_sampling_client(self, name: str | None = None, **_kw) -> Future:
        def snapshot():
            _, directory = self.sc.service.store(self.run, "sampler_weights", f"snapshot-{uuid.uuid4().hex[:8]}")
            self.local.save_weights_for_sampler(directory)
            return SamplingClient(self.sc, directory)

        return self._op("save_weights_and_get_sampling_client", snapshot)

    def get_tokenizer(self):
        return self.local.tokenizer


class SamplingClient:
    def __init__(self, service_client: ServiceClient, model_dir: Path) -> None:
        self.sc = service_client
        self.local = LocalTrainingClient(model_dir, lora_rank=0, seed=0, device="cpu", bf16=False)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams, **_kw) -> Future:
        expect(prompt, types.ModelInput, "prompt")
        expect(sampling_params, types.SamplingParams, "sampling_params")

        def run():
            stop = sampling_params.stop
            if stop == []:
                raise NotImplementedError("stand-in: stop=[] (never stop, not even at end-of-sequence) is not modelled")
            stops = [stop] if isinstance(stop, str) else list(stop or [])
            params = SamplingParams(max_tokens=sampling_params.max_tokens or 32, temperature=sampling_params.temperature,
                                    top_p=sampling_params.top_p, stop=stops, seed=sampling_params.seed or 0)
            [group] = self.local.sample([prompt.to_ints()], num_samples, params)
            return types.SampleResponse(sequences=[
                types.SampledSequence(stop_reason=s.stop_reason, sequence_id=uuid.uuid4().hex,
                                      tokens_np=np.array(s.tokens, dtype=np.int32), logprobs_np=np.array(s.logprobs, dtype=np.float32))
                for s in group])

        return self.sc.service.op(self.sc.api_key, "sample", run)

    def compute_logprobs(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None) -> Future:
        expect(prompt, types.ModelInput, "prompt")
        return self.sc.service.op(self.sc.api_key, "compute_logprobs",
                                  lambda: [None] + self.local.compute_logprobs([prompt.to_ints()])[0])
