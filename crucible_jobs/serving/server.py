"""`crucible serve MODEL`: put the engine, the alias follower, the response log and the HTTP
app together and run them under uvicorn. A model the registry or the store cannot give fails
here, before the port is bound, with the registry's own message."""

from __future__ import annotations

import logging
import os

from crucible_jobs.serving.app import Served, create_app
from crucible_jobs.serving.engine import BatchingEngine
from crucible_jobs.serving.responses import ResponseLog
from crucible_jobs.serving.served_model import AliasFollower, load_version, model_spec
from resources.backends.local.backend import LocalTorchBackend
from resources.store.artifact_store import ArtifactStore
from resources.store.home import crucible_home
from resources.store.registry import ModelRegistry

API_KEY_VARIABLE = "CRUCIBLE_SERVE_API_KEY"


def build(spec: str, precision: str = "auto", threads: int = 0, max_rows: int = 64, max_tokens: int = 256,
          poll_seconds: float = 1.0, keep_responses: int = 100_000, registry: ModelRegistry | None = None,
          store: ArtifactStore | None = None):
    registry, store = registry or ModelRegistry(), store or ArtifactStore()
    backend = LocalTorchBackend(precision=precision, threads=threads)

    def load():
        return load_version(registry, store, spec, backend)

    engine = BatchingEngine(load(), max_rows=max_rows, default_max_tokens=max_tokens)
    name = model_spec(spec).split("@")[0].split(":")[0]
    served = Served(name=name, spec=spec, engine=engine, follower=AliasFollower(engine, load, registry, spec, poll_seconds),
                    responses=ResponseLog(crucible_home() / "serve" / "responses.sqlite", keep_responses),
                    api_key=os.environ.get(API_KEY_VARIABLE) or None)
    return create_app(served)


def serve(spec: str, host: str, port: int, **settings) -> None:
    import uvicorn

    app = build(spec, **settings)
    log = logging.getLogger("crucible.serve")  # the follower's swaps, in uvicorn's format
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    uvicorn.run(app, host=host, port=port, log_level="info")
