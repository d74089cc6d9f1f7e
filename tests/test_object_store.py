"""The artifact store on object storage: sl_basic up to its checkpoint with CRUCIBLE_STORE
an s3:// URL on a local S3-compatible server (moto). Artifacts land in the bucket, a second
machine (a fresh CRUCIBLE_HOME) gets every asset as a cache hit from the bucket, large files
are stored once under files/<sha256>, and the audit checks the bucket's bytes and names each
file that reads a corrupted one."""

import json

import pytest
import s3fs

from conftest import run_job
from crucible_jobs.cli import main as crucible
from local_services import s3_url  # noqa: F401  (fixture)
from resources.store.artifact_store import ArtifactStore
from test_data_parallel import UP_TO_CHECKPOINT, checkpoint_config
from test_sl_basic_job import cached_flags, data_versions


@pytest.mark.slow
def test_artifacts_stored_cached_and_audited_on_s3(homes, s3_url, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("CRUCIBLE_STORE", s3_url)
    first = run_job("sl_basic", checkpoint_config(1), assets=UP_TO_CHECKPOINT)
    assert first.success and not any(cached_flags(first).values())

    bucket = s3fs.S3FileSystem()
    root = s3_url.removeprefix("s3://")
    ref = ArtifactStore().latest("sl_basic/checkpoint")
    manifest = json.loads(bucket.cat_file(f"{root}/manifests/{ref.fingerprint}.json"))
    assert manifest["content_hash"] == ref.content_hash
    stored = {p.removeprefix(f"{root}/objects/{ref.content_hash}/") for p in bucket.find(f"{root}/objects/{ref.content_hash}")}
    large = {"model/model.safetensors", "state/model/model.safetensors", "state/optimizer.safetensors"}
    assert stored == set(manifest["files"]) - large  # the large files are stored once for the store, by content
    weights_sha = manifest["files"]["model/model.safetensors"]
    assert manifest["files"]["state/model/model.safetensors"] == weights_sha  # the resumable state's copy is the same object
    shared = {p.removeprefix(f"{root}/files/") for p in bucket.find(f"{root}/files")}
    assert {weights_sha, manifest["files"]["state/optimizer.safetensors"]} <= shared
    assert json.loads(bucket.cat_file(f"{root}/refs/sl_basic/checkpoint.json"))["content_hash"] == ref.content_hash
    assert bucket.find(f"{root}/tmp") == []  # every upload was moved out of its temp key

    # another machine: nothing local, everything from the bucket
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    second = run_job("sl_basic", checkpoint_config(1), assets=UP_TO_CHECKPOINT)
    assert all(cached_flags(second).values())
    assert data_versions(second) == data_versions(first)
    assert ArtifactStore().latest_verified("sl_basic/checkpoint").dir.is_relative_to(tmp_path / "second_machine")

    assert crucible(["audit", "sl_basic/checkpoint"]) == 0
    weights = f"{root}/files/{weights_sha}"
    data = bytearray(bucket.cat_file(weights))
    data[-1] ^= 0xFF
    bucket.pipe_file(weights, bytes(data))
    capsys.readouterr()
    assert crucible(["audit", "sl_basic/checkpoint"]) == 1
    out = capsys.readouterr().out
    assert "model/model.safetensors" in out and "state/model/model.safetensors" in out  # both read the damaged copy
