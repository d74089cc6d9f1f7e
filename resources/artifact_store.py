"""Content-addressed artifact store.

Layout under `root` (default `$CRUCIBLE_HOME/store`):

    objects/<content_hash>/...   immutable artifact files, never rewritten
    manifests/<fingerprint>.json what produced an object: config, upstream, run, file hashes
    refs/<recipe>/<stage>.json   the latest artifact of an asset key (what downstream loads)
    work/<fingerprint>/          resumable scratch of an unfinished materialization
    tmp/                         staging; a crash leaves debris here and nowhere else

An artifact is built in tmp/, hashed, and renamed into objects/ in one step; its manifest
is the commit point and is written (atomically) only after the object exists, so a
reader either sees a complete artifact or none. A fingerprint that already has a manifest
is a cache hit: the caller gets the stored ref and does no work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from dagster import ConfigurableResource
from pydantic import BaseModel, Field, field_validator

from resources.home import crucible_home


class ArtifactRef(BaseModel):
    """What an asset hands downstream: where its bytes are and which bytes they are."""

    key: str
    fingerprint: str
    content_hash: str
    path: str

    @field_validator("key")
    @classmethod
    def _safe_key(cls, v: str) -> str:
        return check_key(v)

    @field_validator("fingerprint", "content_hash")
    @classmethod
    def _safe_hash(cls, v: str, info) -> str:
        return check_hex(v, info.field_name)

    @property
    def dir(self) -> Path:
        return Path(self.path)


class IntegrityError(RuntimeError):
    pass


# Names that become paths under the store: an asset key is slash-separated segments of
# word characters, dots and dashes (no `..`, no absolute path); hashes are lowercase hex.
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_HEX = re.compile(r"[0-9a-f]{1,64}")


def check_key(key: str) -> str:
    """An asset key safe to use as a path under the store, or ValueError naming it."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"asset key {key!r} is not a plain relative name (letters, digits, _ . - and /); "
                         "it could escape the store")
    return key


def check_hex(name: str, what: str) -> str:
    if not isinstance(name, str) or not _HEX.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a hex digest; it could escape the store")
    return name


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(**parts: Any) -> str:
    """hash(asset key, code_version, resolved config, upstream data versions, backend identity)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> tuple[str, dict[str, str]]:
    """Content hash of a directory: names and bytes of every file, order-independent."""
    files = {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    digest = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in files.items()).encode())
    return digest.hexdigest()[:32], files


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill between open and rename leaves no debris
        tmp.unlink(missing_ok=True)
        raise


class ArtifactStore(ConfigurableResource):
    """Local directory store; `root` defaults to `$CRUCIBLE_HOME/store`."""

    root: str = Field(default="", description="Store directory; empty means $CRUCIBLE_HOME/store")

    @property
    def base(self) -> Path:
        return Path(self.root) if self.root else crucible_home() / "store"

    def _manifest_path(self, fp: str) -> Path:
        return self.base / "manifests" / f"{check_hex(fp, 'fingerprint')}.json"

    def _ref_path(self, key: str) -> Path:
        return self.base / "refs" / f"{check_key(key)}.json"

    def lookup(self, fp: str) -> ArtifactRef | None:
        path = self._manifest_path(fp)
        if not path.exists():
            return None
        m = json.loads(path.read_text())
        return self._ref(m)

    def _ref(self, manifest: dict) -> ArtifactRef:
        return ArtifactRef(
            key=manifest["key"],
            fingerprint=manifest["fingerprint"],
            content_hash=manifest["content_hash"],
            path=str(self.base / "objects" / manifest["content_hash"]),
        )

    def manifest(self, fp: str) -> dict:
        path = self._manifest_path(fp)
        if not path.exists():
            raise FileNotFoundError(f"no manifest for fingerprint {fp} in {self.base}")
        return json.loads(path.read_text())

    def ancestry(self, fp: str) -> list[dict]:
        """Manifests of an artifact and every ancestor in the store, each once, upstream
        first (so the first one that differs between two stores is the one to blame)."""
        order: list[dict] = []
        seen: set[str] = set()

        def visit(f: str) -> None:
            if f in seen or not self._manifest_path(f).exists():
                return
            seen.add(f)
            m = self.manifest(f)
            for u in m["upstream"]:
                visit(u["fingerprint"])
            order.append(m)

        visit(fp)
        return order

    def work_dir(self, fp: str) -> Path:
        path = self.base / "work" / check_hex(fp, "fingerprint")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self) -> Path:
        path = self.base / "tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def write(
        self,
        key: str,
        fp: str,
        build: Callable[[Path], dict | None],
        record: dict,
    ) -> ArtifactRef:
        """Build an artifact in staging, then publish it; `build` may return a summary dict."""
        check_key(key)
        self._manifest_path(fp)  # refuses an unsafe fingerprint before any work
        staging = self.staging_dir()
        try:
            summary = build(staging) or {}
            content_hash, files = hash_tree(staging)
            obj = self.base / "objects" / content_hash
            obj.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, obj)
            except OSError as e:
                # same bytes already published (by another fingerprint, or by a concurrent
                # materialization of this one): keep the first copy, drop ours
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not obj.is_dir():
                    raise
                shutil.rmtree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {
            **record,
            "key": key,
            "fingerprint": fp,
            "content_hash": content_hash,
            "files": files,
            "summary": summary,
        }
        atomic_write_text(self._manifest_path(fp), json.dumps(manifest, indent=1, sort_keys=True, default=str))
        shutil.rmtree(self.base / "work" / fp, ignore_errors=True)
        return self._ref(manifest)

    def set_latest(self, ref: ArtifactRef) -> None:
        atomic_write_text(self._ref_path(ref.key), ref.model_dump_json())

    def latest(self, key: str) -> ArtifactRef:
        path = self._ref_path(key)
        if not path.exists():
            raise FileNotFoundError(f"asset {key} has not been materialized in {self.base}")
        stored = ArtifactRef.model_validate_json(path.read_text())
        # the object's place is derived from this store, never taken from the file: a moved
        # or copied CRUCIBLE_HOME still reads its own bytes, and a ref edited to point
        # elsewhere cannot make a reader load files outside the store
        return stored.model_copy(update={"path": str(self.base / "objects" / stored.content_hash)})

    def latest_verified(self, key: str) -> ArtifactRef:
        ref = self.latest(key)
        self.open_verified(ref)
        return ref

    def verify(self, ref: ArtifactRef) -> list[str]:
        """Files whose bytes no longer match the manifest (missing, extra or changed)."""
        expected = self.manifest(ref.fingerprint)["files"]
        if not ref.dir.is_dir():
            return sorted(expected)
        _, actual = hash_tree(ref.dir)
        return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))

    def open_verified(self, ref: ArtifactRef) -> Path:
        """The artifact's directory, after every file's bytes matched the manifest; otherwise
        IntegrityError naming each file that differs, so corrupt bytes are never loaded."""
        bad = self.verify(ref)
        if bad:
            raise IntegrityError(
                f"artifact {ref.key} ({ref.content_hash}) at {ref.path} fails its manifest: "
                + ", ".join(bad)
            )
        return ref.dir
