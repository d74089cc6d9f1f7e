"""Content-addressed artifact store.

Layout under `root` (default `$CRUCIBLE_HOME/store`):

    objects/<content_hash>/...   immutable artifact files, never rewritten
    files/<sha256>               one copy of each large file; objects hold hard links to it
    manifests/<fingerprint>.json what produced an object: config, upstream, run, file hashes
    refs/<recipe>/<stage>.json   the latest artifact of an asset key (what downstream loads)
    verdicts/<fingerprint>.json  a check's result on one data version (checks, data, code)
    work/<fingerprint>/          resumable scratch of an unfinished materialization
    work/<fingerprint>.lock      held while one process builds that fingerprint
    tmp/                         staging; a crash leaves debris here and nowhere else

An artifact is built in tmp/, hashed, and renamed into objects/ in one step; its manifest
is the commit point and is written (atomically) only after the object exists, so a
reader either sees a complete artifact or none. A fingerprint that already has a manifest
is a cache hit: the caller gets the stored ref and does no work. Two processes asking for
the same missing fingerprint build it once: the second waits on the lock, then hits.

With a URL root (s3://bucket/prefix or any fsspec URL) the remote tree is authoritative
(resources/store/object_store.py) and the local layout above becomes this machine's cache of it
under $CRUCIBLE_HOME/store-cache/: artifacts are built and verified locally, published
remotely (files, then manifest, then ref), and fetched from the remote on first use.
Resumable work/ and its lock stay local to the machine that trains.

The same bytes recur along a chain: a checkpoint's weights are also in its resumable state,
its registered model and the next recipe's base model. On local disk each file of at least
SHARED_MIN_BYTES is stored once under files/<sha256> and every object holding it is a hard
link to that copy (where the filesystem has hard links); an object's manifest, its hash
and `open_verified` are unchanged, and gc drops a shared file once no object links to it.
A remote store keeps them once under its own files/<sha256> (object_store.py), and a machine's
cache of it links what it fetches into its local files/ the same way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from dagster import ConfigurableResource
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from resources.store.home import crucible_home
from resources.store.object_store import RemoteTree
from resources.store.shared_files import file_sha256, share_files


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


def hash_tree(root: Path) -> tuple[str, dict[str, str]]:
    """Content hash of a directory: names and bytes of every file, order-independent."""
    files = {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    digest = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in files.items()).encode())
    return digest.hexdigest()[:32], files


def stat_signature(root: Path) -> tuple:
    """Name, size, mtime and inode of every file under root: what any rewrite of a file changes."""
    return tuple((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino)
                 for p in sorted(root.rglob("*")) if p.is_file() for st in [p.stat()])


# (object dir, fingerprint) -> stat_signature of the files when this process last found them
# matching that manifest: a run reads the same object several times (its cache hit, then each
# downstream input), and re-hashing unchanged files only repeats the answer.
_VERIFIED: dict[tuple[Path, str], tuple] = {}


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


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class ArtifactStore(ConfigurableResource):
    """A local directory, or an fsspec URL with a local cache; `root` defaults to
    `$CRUCIBLE_STORE`, else `$CRUCIBLE_HOME/store`."""

    root: str = Field(default="", description="Store directory or fsspec URL (s3://bucket/prefix, gs://...); "
                                              "empty means $CRUCIBLE_STORE, else $CRUCIBLE_HOME/store")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for a URL root, e.g. "
                                            "{endpoint_url: ...}; credentials come from the environment, never from here")

    _remote: RemoteTree | None = PrivateAttr(default=None)

    @property
    def location(self) -> str:
        return self.root or os.environ.get("CRUCIBLE_STORE") or str(crucible_home() / "store")

    @property
    def remote(self) -> RemoteTree | None:
        if self._remote is None and is_url(self.location):
            self._remote = RemoteTree(self.location, self.storage_options)
        return self._remote

    @property
    def base(self) -> Path:
        """The local tree: the store itself, or this machine's cache of a remote one."""
        if is_url(self.location):
            return crucible_home() / "store-cache" / hashlib.sha256(self.location.encode()).hexdigest()[:16]
        return Path(self.location.removeprefix("file://"))

    def _pull_text(self, rel: str, local: Path) -> bool:
        """Copies one remote manifest or ref into the local tree; False where there is none."""
        text = self.remote.read_text(rel) if self.remote else None
        if text is None:
            return False
        atomic_write_text(local, text)
        return True

    def _present(self, path: Path) -> bool:
        """A manifest or verdict file is here, or copied here from the remote store."""
        return path.exists() or self._pull_text(path.relative_to(self.base).as_posix(), path)

    def _put_text(self, path: Path, text: str) -> None:
        """A manifest, verdict or ref: to the remote store first (the shared copy), then here."""
        if self.remote:
            self.remote.put_text(path.relative_to(self.base).as_posix(), text)
        atomic_write_text(path, text)

    def _manifest_path(self, fp: str) -> Path:
        return self.base / "manifests" / f"{check_hex(fp, 'fingerprint')}.json"

    def _ref_path(self, key: str) -> Path:
        return self.base / "refs" / f"{check_key(key)}.json"

    def lookup(self, fp: str, fetch: bool = True) -> ArtifactRef | None:
        """`fetch=False` asks only this machine's tree, never the remote store."""
        path = self._manifest_path(fp)
        found = self._present(path) if fetch else path.exists()
        return self._ref(json.loads(path.read_text())) if found else None

    def _ref(self, manifest: dict) -> ArtifactRef:
        return ArtifactRef(
            key=manifest["key"],
            fingerprint=manifest["fingerprint"],
            content_hash=manifest["content_hash"],
            path=str(self.base / "objects" / manifest["content_hash"]),
        )

    def manifest(self, fp: str) -> dict:
        path = self._manifest_path(fp)
        if not self._present(path):
            raise FileNotFoundError(f"no manifest for fingerprint {fp} in {self.base}")
        return json.loads(path.read_text())

    def work_dir(self, fp: str) -> Path:
        path = self.base / "work" / check_hex(fp, "fingerprint")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self) -> Path:
        path = self.base / "tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def build_once(
        self,
        key: str,
        fp: str,
        build: Callable[[Path, Path], dict | None],
        record: dict,
        log: Callable[[str], None] = print,
    ) -> tuple[ArtifactRef, bool]:
        """The stored artifact, or `write` it with `build(out_dir, work_dir)`; True when built.
        The lock keeps a second trainer out of the first one's resumable work dir, where
        each would resume from the other's saves."""
        if (ref := self.lookup(fp)) is not None:
            return ref, False
        lock_path = self.base / "work" / f"{check_hex(fp, 'fingerprint')}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"another process is materializing fingerprint {fp}; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if (ref := self.lookup(fp)) is not None:
                return ref, False
            ref = self.write(key, fp, lambda out: build(out, self.work_dir(fp)), record)
            # published: a later arrival returns at the first lookup, and one waiting on this
            # lock at the second, so the file has done its job (a failed build keeps it)
            lock_path.unlink(missing_ok=True)
            return ref, True

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
            share_files(staging, files, self.base / "files")
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
                os.utime(obj)  # in use again: `crucible gc` leaves recently touched objects alone
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
        text = json.dumps(manifest, indent=1, sort_keys=True, default=str)
        if self.remote:  # files first, manifest last: the remote commit point
            self.remote.publish_dir(obj, f"objects/{content_hash}", files)
        self._put_text(self._manifest_path(fp), text)
        shutil.rmtree(self.base / "work" / fp, ignore_errors=True)
        return self._ref(manifest)

    def _verdict_path(self, fp: str) -> Path:
        return self.base / "verdicts" / f"{check_hex(fp, 'fingerprint')}.json"

    def verdict(self, fp: str) -> dict | None:
        """A check's recorded result for the inputs `fp` fingerprints, or None."""
        path = self._verdict_path(fp)
        return json.loads(path.read_text()) if self._present(path) else None

    def record_verdict(self, fp: str, verdict: dict) -> None:
        self._put_text(self._verdict_path(fp), json.dumps(verdict, indent=1, sort_keys=True, default=str))

    def set_latest(self, ref: ArtifactRef) -> None:
        self._put_text(self._ref_path(ref.key), ref.model_dump_json())

    def latest(self, key: str) -> ArtifactRef:
        path = self._ref_path(key)
        if self.remote and not self._pull_text(f"refs/{check_key(key)}.json", path):  # another machine may have moved it
            raise FileNotFoundError(f"asset {key} has not been materialized in {self.location}")
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

    @staticmethod
    def _mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
        return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))

    def verify(self, ref: ArtifactRef) -> list[str]:
        """Files whose bytes in the store no longer match the manifest (missing, extra or
        changed); with a URL root, the remote bytes."""
        files = self.manifest(ref.fingerprint)["files"]
        if self.remote:
            return self._mismatches(files, self.remote.file_hashes(f"objects/{ref.content_hash}", files))
        return self._mismatches(files, hash_tree(ref.dir)[1] if ref.dir.is_dir() else {})

    def _pull_object(self, ref: ArtifactRef) -> None:
        """Fetch a remote object into this machine's cache, checked before it enters: a damaged
        download is never kept (nor linked into files/), so a repaired bucket is read again."""
        staging = self.staging_dir()
        try:
            files = self.manifest(ref.fingerprint)["files"]
            self.remote.fetch_dir(f"objects/{ref.content_hash}", staging, files)
            if bad := self._mismatches(files, hash_tree(staging)[1]):
                raise IntegrityError(f"artifact {ref.key} ({ref.content_hash}) fetched from {self.location} fails its "
                                     "manifest: " + ", ".join(bad))
            share_files(staging, files, self.base / "files")  # this machine's cache stores each file once too
            ref.dir.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, ref.dir)
            _VERIFIED[(ref.dir, ref.fingerprint)] = stat_signature(ref.dir)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not ref.dir.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def open_verified(self, ref: ArtifactRef) -> Path:
        """The artifact's local directory (fetched first from a remote store), after every
        file's bytes matched the manifest; otherwise IntegrityError naming each file that
        differs, so corrupt bytes are never loaded. Hashed once per process while no file
        under it is rewritten (stat_signature); `verify` always hashes."""
        if self.remote and not ref.dir.is_dir():
            self._pull_object(ref)
        seen = stat_signature(ref.dir) if ref.dir.is_dir() else ()
        if seen and _VERIFIED.get((ref.dir, ref.fingerprint)) == seen:
            return ref.dir
        expected = self.manifest(ref.fingerprint)["files"]
        bad = self._mismatches(expected, hash_tree(ref.dir)[1] if ref.dir.is_dir() else {})
        if bad:
            raise IntegrityError(
                f"artifact {ref.key} ({ref.content_hash}) at {ref.path} fails its manifest: "
                + ", ".join(bad)
            )
        _VERIFIED[(ref.dir, ref.fingerprint)] = seen
        return ref.dir
