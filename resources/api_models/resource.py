"""The `models` resource: which hosted model a judge, labeller or teacher asset calls, and
how (calls.CallSettings). The key is read from the environment when a run starts (a run that
needs one and lacks it fails before any asset runs, naming the variable) and never stored."""

from __future__ import annotations

import os

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from resources.api_models.calls import ApiModelClient, CallSettings
from resources.api_models.providers import KEY_VARIABLES, Provider
from resources.store.artifact_store import ArtifactStore


class MissingKey(RuntimeError):
    pass


class ApiModelsResource(ConfigurableResource):
    provider: Provider = Field(default="openai", description="openai (any OpenAI-compatible base_url too), anthropic or google")
    model: str = Field(default="", description="the provider's model name; empty: no asset of this run calls a hosted model")
    base_url: str = Field(default="", description="e.g. http://127.0.0.1:8000/v1 for crucible serve; empty: the provider's")
    key_variable: str = Field(default="", description="environment variable holding the key; empty: OPENAI_API_KEY, "
                                                      "ANTHROPIC_API_KEY or GEMINI_API_KEY by provider")
    calls: CallSettings = Field(default_factory=CallSettings)
    _key: str | None = PrivateAttr(default=None)

    @property
    def variable(self) -> str:
        return self.key_variable or KEY_VARIABLES[self.provider]

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.model:  # configured: the key must be there before anything runs
            self._key = self.read_key()

    def read_key(self) -> str:
        key = os.environ.get(self.variable, "")
        if not key:
            raise MissingKey(f"models: provider {self.provider} model {self.model!r} needs a key in the environment variable "
                             f"{self.variable}, which is not set")
        return key

    def client(self, store: ArtifactStore) -> ApiModelClient:
        if not self.model:
            raise ValueError("models: no model is configured (resources: models: config: {provider, model})")
        return ApiModelClient(self.provider, self.model, self._key or self.read_key(), self.base_url or None, self.calls,
                              store.base / "api_calls")
