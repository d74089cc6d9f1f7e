"""The authoritative copy of an artifact store on object storage (any fsspec URL: s3://,
gs://, az://, ...), used by ArtifactStore when its root is a URL.

Object stores have no rename and no directories, so publishing follows what they do
guarantee: a single object PUT (or a copy) is atomic and, on S3, GCS and Azure, strongly
read-after-write consistent. Files are uploaded under tmp/<uuid>/ and then moved to their
final keys; a manifest or ref is one object, written to a temp key and moved into place, and
the store writes an artifact's manifest only after every one of its files is in place. A
reader that finds a manifest therefore finds the whole artifact; a writer that dies midway
leaves unreferenced keys under tmp/ or objects/, never a manifest pointing at missing bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import fsspec


class RemoteTree:
    def __init__(self, url: str, storage_options: dict) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = self.root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _files(self, rel: str) -> dict[str, int]:
        """Relative name -> size of every object under `rel`."""
        prefix = self._path(rel)
        found = self.fs.find(prefix, detail=True) if self.fs.exists(prefix) else {}
        return {name[len(prefix) + 1 :]: info["size"] for name, info in found.items()}

    def read_text(self, rel: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(rel)).decode()
        except FileNotFoundError:
            return None

    def put_text(self, rel: str, text: str) -> None:
        tmp = self._path(f"tmp/{uuid.uuid4().hex}")
        self.fs.pipe_file(tmp, text.encode())
        self.fs.mv(tmp, self._path(rel))

    def publish_dir(self, local_dir: Path, rel: str) -> None:
        """Upload a finished artifact; a complete copy already there (same names and sizes:
        the key is the content hash) is kept as it is."""
        local = {p.relative_to(local_dir).as_posix(): p.stat().st_size for p in local_dir.rglob("*") if p.is_file()}
        if self._files(rel) == local:
            return
        staging = f"tmp/{uuid.uuid4().hex}"
        names = sorted(local)
        self.fs.put([str(local_dir / n) for n in names], [self._path(f"{staging}/{n}") for n in names])
        self.fs.mv([self._path(f"{staging}/{n}") for n in names], [self._path(f"{rel}/{n}") for n in names])

    def fetch_dir(self, rel: str, local_dir: Path) -> None:
        names = sorted(self._files(rel))
        if not names:
            raise FileNotFoundError(f"{self._path(rel)} holds no files in {self.url}")
        for n in names:
            (local_dir / n).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([self._path(f"{rel}/{n}") for n in names], [str(local_dir / n) for n in names])

    def file_hashes(self, rel: str) -> dict[str, str]:
        """sha256 of every object under `rel`, streamed from the store (what an audit checks)."""
        hashes = {}
        for name in self._files(rel):
            h = hashlib.sha256()
            with self.fs.open(self._path(f"{rel}/{name}"), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            hashes[name] = h.hexdigest()
        return hashes
