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


def test_a_large_file_is_stored_once_remotely_and_checked_by_its_bytes(remote, tmp_path, monkeypatch):
    """Two artifacts holding the same weights (a checkpoint and its registered model) put one
    remote copy under files/<sha256>; another machine reads both; a damaged shared copy fails
    every artifact that holds it, in verify and in open_verified."""
    weights = bytes(range(256)) * 512  # 128 KiB: over SHARED_MIN_BYTES

    def with_weights(note: str):
        def build(out):
            (out / "model.safetensors").write_bytes(weights)
            (out / "note.txt").write_text(note)
        return build

    store = ArtifactStore(root=URL)
    first = store.write("r/checkpoint", "ab12", with_weights("checkpoint"), {"config": {}})
    second = store.write("r/registered", "cd34", with_weights("registered"), {"config": {}})
    sha = store.manifest("ab12")["files"]["model.safetensors"]
    assert set(remote.find("/bucket/store/files")) == {f"/bucket/store/files/{sha}"}
    for ref in (first, second):
        assert set(remote.find(f"/bucket/store/objects/{ref.content_hash}")) == {
            f"/bucket/store/objects/{ref.content_hash}/note.txt"}
        assert store.verify(ref) == []
    stored = sum(info["size"] for info in remote.find("/bucket/store", detail=True).values())
    assert stored < 1.1 * len(weights)  # one copy of the weights, not two

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    other = ArtifactStore(root=URL)
    for fp, note in (("ab12", "checkpoint"), ("cd34", "registered")):
        path = other.open_verified(other.lookup(fp))
        assert (path / "model.safetensors").read_bytes() == weights and (path / "note.txt").read_text() == note
    assert (path / "model.safetensors").stat().st_nlink == 3  # both objects and the cache's files/ copy

    remote.pipe_file(f"/bucket/store/files/{sha}", weights[:-1] + b"\x00")
    assert store.verify(first) == store.verify(second) == ["model.safetensors"]
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "third_machine"))
    third = ArtifactStore(root=URL)
    with pytest.raises(IntegrityError, match="model.safetensors"):
        third.open_verified(third.lookup("cd34"))
    assert not (third.base / "files").exists()  # the damaged download was not kept, nor linked
    remote.pipe_file(f"/bucket/store/files/{sha}", weights)  # the bucket repaired: the same machine reads it again
    assert (third.open_verified(third.lookup("cd34")) / "model.safetensors").read_bytes() == weights
    remote.rm(f"/bucket/store/files/{sha}")
    assert store.verify(first) == ["model.safetensors"]  # missing shows as missing


def test_a_file_an_artifact_holds_twice_is_downloaded_once(remote, tmp_path, monkeypatch):
    weights = bytes(range(256)) * 512

    def checkpoint(out):  # the weights, and the resumable state's copy of them
        for name in ("model/model.safetensors", "state/model/model.safetensors"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(weights)

    ArtifactStore(root=URL).write("r/checkpoint", "ab12", checkpoint, {"config": {}})
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    other = ArtifactStore(root=URL)
    fetched = []
    real_get = type(other.remote.fs).get
    monkeypatch.setattr(type(other.remote.fs), "get",
                        lambda fs, rpaths, lpaths, **kw: fetched.extend(rpaths) or real_get(fs, rpaths, lpaths, **kw))
    path = other.open_verified(other.lookup("ab12"))
    assert len(fetched) == 1 and fetched[0].endswith(other.manifest("ab12")["files"]["model/model.safetensors"])
    assert (path / "model/model.safetensors").read_bytes() == (path / "state/model/model.safetensors").read_bytes() == weights
