"""A re-run of cached assets is nearly free: loading the Definitions imports no training,
plotting or validation library; a dataset check's verdict on a data version is recorded and
reported again instead of re-validated (a failure included); an artifact verified once in a
process is not re-hashed while its files are untouched, and is re-hashed when one changes."""

import os

import pytest

from conftest import TINY_RUN_CONFIG, heavy_imports_after, run_job
from crucible_assets import checks
from resources.store.artifact_store import ArtifactStore, IntegrityError

DATASET = "sl_basic/dataset"


def test_loading_definitions_imports_no_heavy_library():
    assert heavy_imports_after("import crucible_jobs.definitions")[0] == []


def check_evaluations(result) -> dict[str, tuple[bool, dict]]:
    return {e.event_specific_data.check_name: (e.event_specific_data.passed, e.event_specific_data.metadata)
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_dataset_verdict_is_recorded_and_reused_for_the_same_data_version(homes, monkeypatch):
    first = run_job("sl_basic", TINY_RUN_CONFIG, assets=[DATASET])
    verdicts = check_evaluations(first)
    assert verdicts and all(ok for ok, _ in verdicts.values())
    assert not any("reused_from_run" in meta for _, meta in verdicts.values())

    def must_not_run(_df):
        raise AssertionError("validated again although this data version has a recorded verdict")

    monkeypatch.setattr(checks, "validate", must_not_run)
    second = run_job("sl_basic", TINY_RUN_CONFIG, assets=[DATASET])
    reused = check_evaluations(second)
    assert {name: ok for name, (ok, _) in reused.items()} == {name: ok for name, (ok, _) in verdicts.items()}
    for name, (_, meta) in reused.items():
        assert meta["reused_from_run"].value == first.run_id
        assert meta["great_expectations"] == verdicts[name][1]["great_expectations"]


def test_a_recorded_failure_still_fails_the_run(homes, monkeypatch):
    real = checks.validate

    def no_nulls_fails(df):
        results = real(df)
        return results | {"no_nulls": (False, {"expect_column_values_to_not_be_null": {"success": False, "unexpected_count": 3}})}

    monkeypatch.setattr(checks, "validate", no_nulls_fails)
    assert not run_job("sl_basic", TINY_RUN_CONFIG, raise_on_error=False, assets=[DATASET]).success

    monkeypatch.setattr(checks, "validate", lambda _df: pytest.fail("validated again"))
    again = run_job("sl_basic", TINY_RUN_CONFIG, raise_on_error=False, assets=[DATASET])
    assert not again.success
    ok, meta = check_evaluations(again)["no_nulls"]
    assert not ok and "reused_from_run" in meta


def test_a_changed_dataset_is_validated_again(homes, monkeypatch):
    run_job("sl_basic", TINY_RUN_CONFIG, assets=[DATASET])
    calls = []
    real = checks.validate
    monkeypatch.setattr(checks, "validate", lambda df: calls.append(len(df)) or real(df))
    config = {"ops": {"sl_basic__dataset": {"config": {"num_examples": 300}}}}
    assert run_job("sl_basic", config, assets=[DATASET]).success
    summary = ArtifactStore().manifest(ArtifactStore().latest(DATASET).fingerprint)["summary"]
    assert calls == [summary["train_rows"] + summary["test_rows"]]  # 300 records, less repeats of held-out items


def test_open_verified_hashes_once_until_a_file_changes(tmp_path, monkeypatch):
    store = ArtifactStore(root=str(tmp_path))
    ref = store.write("x/y", "a" * 32, lambda out: (out / "f.bin").write_bytes(b"original") and None, {})
    weights = ref.dir / "f.bin"
    os.utime(weights, ns=(10**18, 10**18))  # written long ago: the flip below gets a new mtime
    store.open_verified(ref)

    import resources.store.artifact_store as artifact_store

    real_hash = artifact_store.hash_tree
    hashed = []
    monkeypatch.setattr(artifact_store, "hash_tree", lambda root: hashed.append(root) or real_hash(root))
    store.open_verified(ref)
    assert hashed == []  # unchanged since this process verified it

    weights.chmod(0o644)
    weights.write_bytes(b"Original")  # same size, flipped in place
    with pytest.raises(IntegrityError, match="f.bin"):
        store.open_verified(ref)
    assert hashed == [ref.dir]
