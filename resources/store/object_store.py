"""The authoritative copy of an artifact store on object storage (any fsspec URL: s3://,
gs://, az://, ...), used by ArtifactStore when its root is a URL.

Object stores have no rename and no directories, so publishing follows what they do
guarantee: a single object PUT (or a copy) is atomic and, on S3, GCS and Azure, strongly
read-after-write consistent. Files are uploaded under tmp/<uuid>/ and then moved to their
final keys; a manifest or ref is one object, written to a temp key and moved into place, and
the store writes an artifact's manifest only after every one of its files is in place. A
reader that finds a manifest therefore finds the whole artifact; a writer that dies midway
leaves unreferenced keys under tmp/, objects/ or files/, never a manifest pointing at missing
bytes. Large files are stored once per store under files/<sha256>, as on local disk
(resources/store/shared_files.py): a checkpoint's weights, the registered model and the next
recipe's base model are one object, not three.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from resources.store.shared_files import SHARED_MIN_BYTES, link_or_copy, stream_sha256


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

    def publish_dir(self, local_dir: Path, rel: str, files: dict[str, str]) -> None:
        """Upload a finished artifact (`files`: its manifest's name -> sha256). Each file of
        at least SHARED_MIN_BYTES goes to files/<sha256> once for the whole store, as on local
        disk, and is skipped when already there; the rest go under `rel`. A complete copy
        already there (the key is the content hash) is kept as it is."""
        sizes = {name: (local_dir / name).stat().st_size for name in files}
        shared = {name for name, size in sizes.items() if size >= SHARED_MIN_BYTES}
        own = {name: size for name, size in sizes.items() if name not in shared}
        uploads = {f"{rel}/{name}": name for name in own} if self._files(rel) != own else {}
        for name in sorted(shared):
            key = f"files/{files[name]}"
            if self._size(key) != sizes[name]:
                uploads[key] = name
        if not uploads:
            return
        staging = f"tmp/{uuid.uuid4().hex}"
        keys = sorted(uploads)
        self.fs.put([str(local_dir / uploads[k]) for k in keys], [self._path(f"{staging}/{k}") for k in keys])
        self.fs.mv([self._path(f"{staging}/{k}") for k in keys], [self._path(k) for k in keys])

    def _size(self, rel: str) -> int | None:
        try:
            return self.fs.info(self._path(rel))["size"]
        except FileNotFoundError:
            return None

    def _sources(self, rel: str, files: dict[str, str]) -> dict[str, str]:
        """Where each file of the artifact under `rel` lies: its own key, or files/<sha256>
        for one stored once for the store (an artifact published before sharing has all its
        own). Files under `rel` the manifest does not list are included, so checks see them."""
        own = self._files(rel)
        return {name: f"{rel}/{name}" if name in own else f"files/{sha}" for name, sha in files.items()} | {
            name: f"{rel}/{name}" for name in own if name not in files}

    def fetch_dir(self, rel: str, local_dir: Path, files: dict[str, str]) -> None:
        """Each source downloaded once: a file the artifact holds twice (a checkpoint's weights
        and its resumable state's copy share files/<sha256>) is linked locally, not fetched again."""
        sources = self._sources(rel, files)
        if not sources:
            raise FileNotFoundError(f"{self._path(rel)} holds no files in {self.url}")
        names = sorted(sources)
        for n in names:
            (local_dir / n).parent.mkdir(parents=True, exist_ok=True)
        first = {}
        for n in names:
            first.setdefault(sources[n], n)
        self.fs.get([self._path(src) for src in first], [str(local_dir / n) for n in first.values()])
        for n in names:
            if first[sources[n]] != n:
                link_or_copy(local_dir / first[sources[n]], local_dir / n)

    def file_hashes(self, rel: str, files: dict[str, str]) -> dict[str, str]:
        """sha256 of every file of the artifact under `rel`, streamed from the store (what an
        audit checks), each source once: a shared file is hashed from its files/<sha256> copy,
        never trusted by its name; one that is missing is left out, so it shows as missing."""
        by_source: dict[str, str | None] = {}
        for source in set(self._sources(rel, files).values()):
            try:
                with self.fs.open(self._path(source), "rb") as f:
                    by_source[source] = stream_sha256(f)
            except FileNotFoundError:
                by_source[source] = None
        return {name: by_source[source] for name, source in self._sources(rel, files).items()
                if by_source[source] is not None}
