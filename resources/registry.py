"""A minimal model registry: numbered versions per model name, and aliases (`latest`,
`champion`). One JSON file replaced atomically under a file lock, plus an append-only
audit log of every change."""

from __future__ import annotations

import fcntl
import getpass
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from resources.artifact_store import atomic_write_text
from resources.home import crucible_home


# A model name is one plain word: no path separators, no `@` or `:` (those select an alias
# or a version in a spec), so no name can address anything but its own registry entry.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"model name {name!r} is not a plain name (letters, digits, _ . -)")
    return name


class ModelRegistry(ConfigurableResource):
    root: str = Field(default="", description="Registry directory; empty means $CRUCIBLE_HOME/registry")

    @property
    def base(self) -> Path:
        return Path(self.root) if self.root else crucible_home() / "registry"

    def _read(self) -> dict:
        path = self.base / "registry.json"
        return json.loads(path.read_text()) if path.exists() else {"models": {}}

    @contextmanager
    def _locked(self):
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            atomic_write_text(self.base / "registry.json", json.dumps(data, indent=1, sort_keys=True))

    def _audit(self, event: dict) -> None:
        with open(self.base / "audit.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "user": getpass.getuser(), **event}) + "\n")

    def models(self) -> dict:
        return self._read()["models"]

    def find(self, name: str, fingerprint: str) -> dict | None:
        check_name(name)
        model = self.models().get(name, {"versions": []})
        return next((v for v in model["versions"] if v["fingerprint"] == fingerprint), None)

    def register(self, name: str, entry: dict, metric: str, lower_is_better: bool = True) -> dict:
        """Add a version (idempotent per fingerprint); `champion` moves only on a better metric."""
        check_name(name)
        with self._locked() as data:
            model = data["models"].setdefault(name, {"versions": [], "aliases": {}})
            existing = next((v for v in model["versions"] if v["fingerprint"] == entry["fingerprint"]), None)
            if existing:
                return existing
            version = {**entry, "version": len(model["versions"]) + 1, "registered_at": time.time()}
            model["versions"].append(version)
            model["aliases"]["latest"] = version["version"]
            champion = model["aliases"].get("champion")
            best = model["versions"][champion - 1]["metrics"].get(metric) if champion else None
            new = version["metrics"].get(metric)
            if best is None or (new is not None and (new < best if lower_is_better else new > best)):
                model["aliases"]["champion"] = version["version"]
        self._audit({"event": "register", "model": name, "version": version["version"], "aliases": model["aliases"]})
        return version

    def resolve(self, spec: str) -> dict:
        """`name`, `name@alias` or `name:version` to a version entry."""
        name, alias, number = spec, "latest", None
        if "@" in spec:
            name, alias = spec.split("@", 1)
        elif ":" in spec:
            name, num = spec.split(":", 1)
            if not num.isdigit():
                raise KeyError(f"model spec {spec!r}: version {num!r} is not a number")
            number = int(num)
        check_name(name)
        model = self.models().get(name)
        if model is None:
            raise KeyError(f"no registered model named {name!r} in {self.base}")
        if number is None:
            if alias not in model["aliases"]:
                raise KeyError(f"model {name!r} has no alias {alias!r}")
            number = model["aliases"][alias]
        if not 1 <= number <= len(model["versions"]):
            raise KeyError(f"model {name!r} has no version {number}")
        return model["versions"][number - 1]
