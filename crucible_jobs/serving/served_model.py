"""Which registered model `crucible serve` answers with, loaded from the store's verified
bytes, and the watcher that follows an alias: when `dpo@champion` moves, the new version is
loaded beside the old one and handed to the engine, which switches once the requests in
flight have finished."""

from __future__ import annotations

import logging
import threading
import time

from resources.backends.local.backend import LocalTorchBackend
from resources.hf_io import load_model, load_tokenizer
from resources.store.artifact_store import ArtifactStore
from resources.store.registry import ModelRegistry
from crucible_jobs.serving.engine import BatchingEngine, LoadedModel

log = logging.getLogger("crucible.serve")


def model_spec(spec: str) -> str:
    """A plain name serves its champion: the version that passed its gate, not merely the latest."""
    return spec if "@" in spec or ":" in spec else f"{spec}@champion"


def resolve(registry: ModelRegistry, spec: str) -> dict:
    """The registry entry; a KeyError's message says what is missing."""
    return registry.resolve(model_spec(spec))


def load_version(registry: ModelRegistry, store: ArtifactStore, spec: str, backend: LocalTorchBackend,
                 trust_remote_code: bool = False) -> LoadedModel:
    entry = resolve(registry, spec)
    name = model_spec(spec).split("@")[0].split(":")[0]
    ref = store.lookup(entry["fingerprint"])
    if ref is None:
        raise FileNotFoundError(f"{name}:{entry['version']} (fingerprint {entry['fingerprint']}) is in the registry but "
                                "not in the artifact store")
    model_dir = store.open_verified(ref)  # never load bytes that differ from the manifest
    if backend.threads:
        import torch

        torch.set_num_threads(backend.threads)
    device = backend.resolved_device()
    model = load_model(model_dir, device, trust_remote_code).eval()
    if backend.resolved_precision() == "bf16":  # weights cast once: autocast would cast them again at every decode step
        import torch

        model = model.to(torch.bfloat16)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    eos = model.generation_config.eos_token_id
    stop_ids = [i for i in dict.fromkeys([tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]) if i is not None]
    return LoadedModel(model=model, tokenizer=tokenizer, version=f"{name}:{entry['version']}",
                       context_length=model.config.max_position_embeddings, stop_ids=stop_ids, device=device)


class AliasFollower:
    """Polls the registry (one small JSON read) and swaps the engine to the version the alias
    names now. A version that fails to load is logged and retried after `retry_seconds` (a
    store that was briefly unreachable); the old one keeps serving meanwhile."""

    def __init__(self, engine: BatchingEngine, load, registry: ModelRegistry, spec: str, interval: float = 1.0,
                 retry_seconds: float = 60.0):
        self.engine, self.load, self.registry, self.spec, self.interval = engine, load, registry, spec, interval
        self.retry_seconds = retry_seconds
        self.on_swap = lambda: None
        self._failed: dict[int, float] = {}  # version -> when its load failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="crucible-serve-follower", daemon=True)

    def start(self) -> AliasFollower:
        if "@" in model_spec(self.spec):  # a pinned version never moves
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        current = self.engine.version
        while not self._stop.wait(self.interval):
            try:
                version = resolve(self.registry, self.spec)["version"]
            except (KeyError, OSError, ValueError) as e:  # a registry mid-edit by hand: keep serving
                log.warning("cannot resolve %s: %s", self.spec, e)
                continue
            target = f"{current.rsplit(':', 1)[0]}:{version}"
            if target == current or time.monotonic() - self._failed.get(version, -1e18) < self.retry_seconds:
                continue
            try:
                loaded = self.load()
            except Exception as e:  # noqa: BLE001 - any failure keeps the old model serving
                self._failed[version] = time.monotonic()
                log.error("cannot load %s (%s): %s; still serving %s", target, self.spec, e, current)
                continue
            log.info("%s moved: %s -> %s", model_spec(self.spec), current, loaded.version)
            self.engine.swap(loaded)
            self.on_swap()
            current = loaded.version
