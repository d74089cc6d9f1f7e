"""The artifact store on object storage: sl_basic up to its checkpoint with CRUCIBLE_STORE
an s3:// URL on a local S3-compatible server (moto). Artifacts land in the bucket, a second
machine (a fresh CRUCIBLE_HOME) gets every asset as a cache hit from the bucket, and the
audit checks the bucket's bytes and names a corrupted one."""

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
    assert stored == set(manifest["files"]) and "model/model.safetensors" in stored
    assert json.loads(bucket.cat_file(f"{root}/refs/sl_basic/checkpoint.json"))["content_hash"] == ref.content_hash
    assert bucket.find(f"{root}/tmp") == []  # every upload was moved out of its temp key

    # another machine: nothing local, everything from the bucket
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "second_machine"))
    second = run_job("sl_basic", checkpoint_config(1), assets=UP_TO_CHECKPOINT)
    assert all(cached_flags(second).values())
    assert data_versions(second) == data_versions(first)
    assert ArtifactStore().latest_verified("sl_basic/checkpoint").dir.is_relative_to(tmp_path / "second_machine")

    assert crucible(["audit", "sl_basic/checkpoint"]) == 0
    weights = f"{root}/objects/{ref.content_hash}/model/model.safetensors"
    data = bytearray(bucket.cat_file(weights))
    data[-1] ^= 0xFF
    bucket.pipe_file(weights, bytes(data))
    capsys.readouterr()
    assert crucible(["audit", "sl_basic/checkpoint"]) == 1
    assert "model/model.safetensors" in capsys.readouterr().out
