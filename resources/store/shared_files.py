"""Each large file of the store once: objects hold hard links to files/<sha256> (see
resources/store/artifact_store.py's docstring for where this sits in publishing)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from pathlib import Path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f) -> str:
    """sha256 of an open binary file (local or fsspec), read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src where the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


SHARED_MIN_BYTES = 1 << 16  # below this a link saves less than it costs to keep track of


def share_files(staging: Path, files: dict[str, str], pool: Path) -> None:
    """Each large file of a staged artifact becomes a hard link to pool/<sha256>: the pool's
    copy when it holds those bytes (re-hashed first, so a damaged pool file is replaced, not
    spread), else ours, added to the pool. A filesystem without hard links keeps the copies."""
    for rel, sha in files.items():
        path = staging / rel
        if path.stat().st_size < SHARED_MIN_BYTES:
            continue
        shared = pool / sha
        try:
            pool.mkdir(exist_ok=True)
            link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.link")
            try:
                if not (shared.exists() and file_sha256(shared) == sha):
                    raise FileNotFoundError(shared)
                os.link(shared, link)
                os.replace(link, path)
            except FileNotFoundError:  # none yet, damaged, or collected by gc just now: ours becomes the copy
                os.link(path, link)
                os.replace(link, shared)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
