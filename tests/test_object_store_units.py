"""The store with a URL root, on fsspec's in-memory filesystem (no server): publish order,
a second machine reading through its own cache, a writer dying before its manifest, and
corruption in the remote copy."""

import fsspec
import pytest

from resources.store.artifact_store import ArtifactStore, IntegrityError
from resources.store.object_store import RemoteTree

URL = "memory://bucket/store"


@pytest.fixture
def remote(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "first_machine"))
    monkeypatch.delenv("CRUCIBLE_STORE", raising=False)
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/bucket", recursive=True)


def build(out):
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    return {"steps": 1}


def test_publish_then_read_from_another_machine(remote, tmp_path, monkeypatch):
    store = ArtifactStore(root=URL)
    ref = store.write("r/checkpoint", "ab12", build, {"config": {}})
    store.set_latest(ref)
    keys = set(remote.find("/bucket/store"))
    assert keys == {f"/bucket/store/objects/{ref.content_hash}/model/weights.bin",
                    f"/bucket/store/objects/{ref.content_hash}/metrics.jsonl",
                    "/bucket/store/manifests/ab12.json", "/bucket/store/refs/r/checkpoint.json"}  # nothing left in tmp/

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    other = ArtifactStore(root=URL)
    assert not other.base.exists()
    hit = other.lookup("ab12")
    assert hit is not None and hit.content_hash == ref.content_hash
    path = other.open_verified(other.latest("r/checkpoint"))
    assert path.is_relative_to(tmp_path / "second_machine")
    assert (path / "model" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert other.manifest("ab12")["summary"] == {"steps": 1}


def test_a_writer_dying_before_its_manifest_publishes_nothing(remote, monkeypatch):
    store = ArtifactStore(root=URL)
    real_put = RemoteTree.put_text

    def die_on_manifest(self, rel, text):
        if rel.startswith("manifests/"):
            assert len(remote.find("/bucket/store/objects")) == 2  # every file is in place before the manifest
            raise ConnectionError("killed")
        real_put(self, rel, text)

    monkeypatch.setattr(RemoteTree, "put_text", die_on_manifest)
    with pytest.raises(ConnectionError):
        store.write("r/checkpoint", "ab12", build, {"config": {}})
    assert not remote.exists("/bucket/store/manifests/ab12.json")
    monkeypatch.setattr(RemoteTree, "put_text", real_put)
    assert ArtifactStore(root=URL).remote.read_text("manifests/ab12.json") is None

    ref = store.write("r/checkpoint", "ab12", build, {"config": {}})  # the retry completes the same object
    assert store.verify(ref) == []


def test_verify_checks_the_remote_bytes_and_a_corrupt_object_is_never_loaded(remote, tmp_path, monkeypatch):
    store = ArtifactStore(root=URL)
    ref = store.write("r/checkpoint", "ab12", build, {"config": {}})
    remote.pipe_file(f"/bucket/store/objects/{ref.content_hash}/metrics.jsonl", b'{"step": 1}\n')
    assert store.verify(ref) == ["metrics.jsonl"]

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    other = ArtifactStore(root=URL)
    with pytest.raises(IntegrityError, match="metrics.jsonl"):
        other.open_verified(other.lookup("ab12"))
