"""Each large file is stored once (resources/store/artifact_store.py, `share_files`): objects
holding the same bytes are hard links to files/<sha256>, every object still verifies
against its own manifest, a damaged shared copy is never linked into a new artifact, and
gc drops a shared copy only when no object links it any more."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resources.store import gc
from resources.store.artifact_store import ArtifactStore, IntegrityError
from resources.store.shared_files import SHARED_MIN_BYTES, file_sha256
from resources.store.registry import ModelRegistry

WEIGHTS = bytes(range(256)) * (SHARED_MIN_BYTES // 256 + 1)  # just over the sharing threshold


@pytest.fixture
def store(tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "crucible"))
    monkeypatch.delenv("CRUCIBLE_STORE", raising=False)
    return ArtifactStore()


def write(store: ArtifactStore, key: str, files: dict[str, bytes]):
    def build(d: Path):
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
    fp = f"{abs(hash((key, tuple(files)))):032x}"[:32]
    return store.write(key, fp, build, {"code_version": "1", "config": {}, "run_id": "run-" + fp[:6], "upstream": []})


def test_the_same_weights_in_three_artifacts_are_stored_once(store):
    checkpoint = write(store, "r/checkpoint", {"model/model.safetensors": WEIGHTS, "model/config.json": b"{}",
                                               "state/model/model.safetensors": WEIGHTS})
    registered = write(store, "r/registered_model", {"model.safetensors": WEIGHTS, "card.md": b"# r"})
    shared = store.base / "files" / file_sha256(checkpoint.dir / "model" / "model.safetensors")
    copies = [checkpoint.dir / "model/model.safetensors", checkpoint.dir / "state/model/model.safetensors",
              registered.dir / "model.safetensors"]
    assert {p.stat().st_ino for p in copies} == {shared.stat().st_ino} and shared.stat().st_nlink == 4
    assert (checkpoint.dir / "model/config.json").stat().st_nlink == 1  # small files stay plain copies
    assert store.open_verified(checkpoint) and store.open_verified(registered)
    assert store.verify(checkpoint) == [] and store.verify(registered) == []


def test_a_damaged_shared_copy_is_never_linked_into_a_new_artifact(store):
    first = write(store, "r/checkpoint", {"model.safetensors": WEIGHTS})
    shared = store.base / "files" / file_sha256(first.dir / "model.safetensors")
    with open(shared, "r+b") as f:  # bit rot in place: every link to this inode sees it
        f.write(b"\xff")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.open_verified(first)
    second = write(store, "s/base_model", {"model.safetensors": WEIGHTS, "note": b"s"})
    assert store.open_verified(second)
    assert (second.dir / "model.safetensors").read_bytes() == WEIGHTS
    assert shared.stat().st_ino == (second.dir / "model.safetensors").stat().st_ino  # the good copy replaced it


def test_gc_keeps_a_shared_copy_while_any_object_links_it(store, monkeypatch):
    real = gc.last_change
    monkeypatch.setattr(gc, "last_change", lambda p: real(p) - 2 * gc.GRACE_SECONDS)
    registry = ModelRegistry()
    kept = write(store, "r/checkpoint", {"model.safetensors": WEIGHTS})
    store.set_latest(kept)
    dropped = write(store, "old/checkpoint", {"model.safetensors": WEIGHTS, "extra": b"x"})
    shared = store.base / "files" / file_sha256(kept.dir / "model.safetensors")

    report = gc.collect(store, registry, dry_run=False)
    assert {(i.kind, i.path) for i in report.garbage} >= {("object", dropped.dir)}
    assert not any(i.kind == "file" for i in report.garbage) and shared.exists()
    assert sum(i.size for i in report.garbage if i.kind == "object") < len(WEIGHTS)  # the shared bytes were not freed
    assert store.open_verified(kept)

    os.remove(store.base / "refs" / "r" / "checkpoint.json")
    report = gc.collect(store, registry, dry_run=False)
    assert ("file", shared, len(WEIGHTS)) in {(i.kind, i.path, i.size) for i in report.garbage}
    assert not shared.exists() and not kept.dir.exists()
