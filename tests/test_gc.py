"""`crucible gc` (resources/store/gc.py): on a small store built by hand, a dry run deletes
nothing; a real run deletes exactly the unreferenced, old objects and manifests (and the
debris of crashes), keeps every ref's and registry version's whole ancestry, bytes another
fingerprint shares, an object a build may be publishing, an unfinished training's work dir
and the verdicts, and the live chain still audits clean afterwards. The clock is faked by
patching `gc.last_change`; nothing sleeps."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from crucible_jobs.cli import main as crucible
from resources.store import gc, lineage
from resources.store.artifact_store import ArtifactRef, ArtifactStore, fingerprint, hash_tree
from resources.store.registry import ModelRegistry

GATE = {"metric": "test/nll", "lower_is_better": True, "margin": 0.0}
DAY = 86400.0


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "crucible"
    monkeypatch.setenv("CRUCIBLE_HOME", str(home))
    monkeypatch.delenv("CRUCIBLE_STORE", raising=False)
    return home


def _write(store: ArtifactStore, key: str, fp: str, files: dict[str, bytes], upstream: list[ArtifactRef] = ()) -> ArtifactRef:
    def build(d: Path):
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        return {"n": len(files)}

    record = {"code_version": "1", "config": {"fp": fp}, "run_id": "run-" + fp[:6],
              "upstream": [r.model_dump(exclude={"path"}) for r in upstream]}
    return store.write(key, fp, build, record)


def _hand_object(store: ArtifactStore, text: str) -> Path:
    """An object with no manifest: what a build leaves between publishing its bytes and its manifest."""
    staging = store.staging_dir()
    (staging / "part.txt").write_text(text)
    content_hash, _ = hash_tree(staging)
    obj = store.base / "objects" / content_hash
    os.rename(staging, obj)
    return obj


def build_store() -> SimpleNamespace:
    store, registry = ArtifactStore(), ModelRegistry()
    s = SimpleNamespace(store=store, registry=registry, base=store.base)
    # the live chain: ref r/tokenized -> tokenized -> dataset; registry r:1 -> registered -> tokenized
    s.dataset = _write(store, "r/dataset", fingerprint(k="dataset", v=2), {"rows.jsonl": b'{"q": 1}\n' * 50})
    s.tokenized = _write(store, "r/tokenized", fingerprint(k="tokenized"), {"shard/0.bin": bytes(range(256)) * 8}, [s.dataset])
    store.set_latest(s.tokenized)
    s.registered = _write(store, "r/registered_model", fingerprint(k="registered"), {"model.safetensors": b"w" * 3000}, [s.tokenized])
    registry.register("r", {"fingerprint": s.registered.fingerprint, "content_hash": s.registered.content_hash,
                            "metrics": {"test/nll": 1.0}, "run_id": "run"}, GATE)
    # the same dataset bytes under an older fingerprint (an earlier code version): unreferenced,
    # but its object is the live dataset's, so both the object and this manifest stay
    s.shared_orphan = _write(store, "r/dataset", fingerprint(k="dataset", v=1), {"rows.jsonl": b'{"q": 1}\n' * 50})
    assert s.shared_orphan.content_hash == s.dataset.content_hash
    # an orphan: an old config's tokenized artifact that no ref or version reaches any more
    s.orphan = _write(store, "r/tokenized", fingerprint(k="tokenized", old=True), {"shard/0.bin": b"old" * 700}, [s.dataset])
    # a manifest whose object is already gone (a crash between deleting the two)
    s.dangling = _write(store, "r/eval_report", fingerprint(k="dangling"), {"report.json": b"{}"})
    shutil.rmtree(s.dangling.dir)
    # objects with no manifest: one old (a crashed build's), one fresh (a build publishing now)
    s.old_bare = _hand_object(store, "left by a crash")
    s.fresh_bare = _hand_object(store, "being published")
    # work/: an unfinished training (no manifest: a re-run resumes it) with its lock file, and
    # the saves of a published fingerprint that a crash left behind
    s.unfinished = store.work_dir(fingerprint(k="checkpoint", unfinished=True))
    (s.unfinished / "step_000010.pt").write_bytes(b"s" * 500)
    s.lock = s.base / "work" / f"{s.unfinished.name}.lock"
    s.lock.touch()
    s.published_work = store.work_dir(s.orphan.fingerprint)
    (s.published_work / "step_000020.pt").write_bytes(b"t" * 400)
    # tmp/: an old staging dir, a fresh one, and a gc's own interrupted leftover
    s.old_tmp, s.fresh_tmp = store.staging_dir(), store.staging_dir()
    (s.old_tmp / "x").write_text("stale")
    (s.fresh_tmp / "y").write_text("a build writing")
    s.gc_leftover = s.base / "tmp" / "gc-0123abcd-feedbeef"
    s.gc_leftover.mkdir()
    (s.gc_leftover / "z").write_text("half removed")
    store.record_verdict(fingerprint(k="verdict"), {"passed": True})
    s.fresh = {s.fresh_bare, s.fresh_tmp}
    s.garbage = {("manifest", s.base / "manifests" / f"{s.orphan.fingerprint}.json"), ("object", s.orphan.dir),
                 ("manifest", s.base / "manifests" / f"{s.dangling.fingerprint}.json"), ("object", s.old_bare),
                 ("work", s.published_work), ("tmp", s.old_tmp), ("tmp", s.gc_leftover)}
    return s


@pytest.fixture
def aged(monkeypatch):
    """Every path reads as changed two days ago except those in the returned set."""
    fresh: set[Path] = set()
    real = gc.last_change
    monkeypatch.setattr(gc, "last_change", lambda p: real(p) if p in fresh else real(p) - 2 * DAY)
    return fresh


def listing(base: Path) -> set[Path]:
    return set(base.rglob("*"))


def under(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def assert_live_chain_intact(s: SimpleNamespace, targets=("r/tokenized", "r@latest")) -> None:
    for ref in (s.dataset, s.tokenized, s.registered, s.shared_orphan):
        assert s.store.lookup(ref.fingerprint) == ref
        assert s.store.verify(ref) == []
    for target in targets:
        tree = lineage.lineage_tree(s.store, lineage.resolve(target, s.store, s.registry))
        results = list(lineage.audit(s.store, tree))
        assert results and all(not node.get("missing") and bad == [] for node, bad in results)


def test_dry_run_deletes_nothing_then_a_run_deletes_exactly_the_garbage(home, aged):
    s = build_store()
    aged.update(s.fresh)
    before = listing(s.base)
    digest = {p: p.read_bytes() for p in before if p.is_file()}

    report = gc.collect(s.store, s.registry, dry_run=True)
    assert {(i.kind, i.path) for i in report.garbage} == s.garbage
    assert listing(s.base) == before and all(p.read_bytes() == b for p, b in digest.items())
    assert report.total == sum(gc.size_of(p) for _, p in s.garbage) > 0
    kept = {(i.kind, i.path): i.note for i in report.kept}
    assert "unfinished training" in kept[("work", s.unfinished)]
    assert "within 1 h" in kept[("object", s.fresh_bare)]
    assert ("tmp", s.fresh_tmp) in kept
    assert report.building == [] and report.live_manifests == 3  # the ref's chain and the registered model

    done = gc.collect(s.store, s.registry, dry_run=False)
    assert {(i.kind, i.path) for i in done.garbage} == s.garbage
    assert done.total == report.total
    gone = {p for _, p in s.garbage}
    assert listing(s.base) == {p for p in before if not under(p, gone)}  # nothing else touched...
    assert not any(p.name.startswith("gc-") for p in (s.base / "tmp").iterdir())  # ...and no trash left behind
    # what must stay did
    assert s.store.lookup(s.shared_orphan.fingerprint) is not None and s.dataset.dir.is_dir()
    assert s.fresh_bare.is_dir() and s.fresh_tmp.is_dir() and s.lock.exists()
    assert (s.unfinished / "step_000010.pt").read_bytes() == b"s" * 500
    assert list((s.base / "verdicts").iterdir()) and list((s.base / "refs").rglob("*.json"))
    assert s.store.lookup(s.orphan.fingerprint) is None and s.store.lookup(s.dangling.fingerprint) is None
    assert_live_chain_intact(s)
    assert crucible(["audit", "r/tokenized"]) == 0 and crucible(["audit", "r@latest"]) == 0

    again = gc.collect(s.store, s.registry, dry_run=False)
    assert again.garbage == []


def test_everything_within_the_grace_period_stays(home):
    """No faked clock: every entry was just written, so nothing is old enough to go except a
    gc's own tmp/gc-* leftover."""
    s = build_store()
    report = gc.collect(s.store, s.registry, dry_run=False)
    assert {(i.kind, i.path) for i in report.garbage} == {("tmp", s.gc_leftover)}
    assert s.orphan.dir.is_dir() and s.store.lookup(s.orphan.fingerprint) is not None and s.old_bare.is_dir()


def test_a_registry_version_alone_keeps_its_ancestry(home, aged):
    s = build_store()
    aged.update(s.fresh)
    (s.base / "refs" / "r" / "tokenized.json").unlink()  # only the registry reaches the chain now
    report = gc.collect(s.store, s.registry, dry_run=False)
    assert {(i.kind, i.path) for i in report.garbage} == s.garbage
    assert_live_chain_intact(s, targets=("r@latest",))


def test_the_champion_eval_a_decision_compared_with_stays(home, aged):
    """A promotion decision's evidence (the champion evaluated on the candidate's eval set) is
    kept after a later champion_eval replaced it as the ref; the orphan still goes."""
    s = build_store()
    aged.update(s.fresh)
    evidence = _write(s.store, "r/champion_eval", fingerprint(k="champion_eval"), {"champion_eval.json": b"{}"})
    registered = _write(s.store, "r/registered_model", fingerprint(k="registered", v=2), {"model.safetensors": b"v" * 3000})
    s.registry.register("r", {"fingerprint": registered.fingerprint, "content_hash": registered.content_hash,
                              "metrics": {"test/nll": 0.5}, "eval_set": "b" * 32, "run_id": "run"}, GATE)
    s.registry.judge("r", 1, who="t")
    record = {"champion": {"fingerprint": s.registered.fingerprint}, "eval_set": "b" * 32, "champion_value": 1.0,
              "status": "evaluated", "source": {"asset": evidence.key, "fingerprint": evidence.fingerprint,
                                                "data_version": evidence.content_hash}}
    assert s.registry.judge("r", 2, who="t", measured=record)["champion_value_from"]["fingerprint"] == evidence.fingerprint
    report = gc.collect(s.store, s.registry, dry_run=False)
    assert {(i.kind, i.path) for i in report.garbage} == s.garbage
    assert s.store.lookup(evidence.fingerprint) == evidence and s.store.verify(evidence) == []


def test_manifest_of_shared_bytes_stays_and_goes_with_them(home, aged):
    """Two unreferenced fingerprints sharing bytes: both manifests and the one object go
    together once nothing live names that content hash."""
    s = build_store()
    twin = _write(s.store, "r/tokenized", fingerprint(k="twin"), {"shard/0.bin": b"old" * 700})
    assert twin.content_hash == s.orphan.content_hash
    report = gc.collect(s.store, s.registry, dry_run=True)
    paths = {i.path for i in report.garbage}
    assert s.base / "manifests" / f"{twin.fingerprint}.json" in paths and s.orphan.dir in paths
    assert s.base / "manifests" / f"{s.shared_orphan.fingerprint}.json" not in paths


def test_a_fresh_manifest_protects_its_old_object(home, aged):
    """A build that reuses an existing object publishes only a manifest: while that manifest
    is within the grace period (its ref may be on its way), the object stays."""
    s = build_store()
    aged.add(s.base / "manifests" / f"{s.orphan.fingerprint}.json")
    report = gc.collect(s.store, s.registry, dry_run=True)
    assert s.orphan.dir not in {i.path for i in report.garbage}


def test_a_build_in_progress_blocks_deletion(home, aged):
    s = build_store()
    before = listing(s.base)
    with open(s.lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report = gc.collect(s.store, s.registry, dry_run=True)
        assert report.building == [s.unfinished.name]
        assert ("tmp", s.old_tmp) not in {(i.kind, i.path) for i in report.garbage}  # maybe its staging
        with pytest.raises(gc.GcRefused, match="build is in progress"):
            gc.collect(s.store, s.registry, dry_run=False)
        assert crucible(["gc"]) == 2
    assert listing(s.base) == before
    assert gc.builds_in_progress(s.base) == []  # released: a lock file alone is no build


def test_a_crash_midway_never_leaves_half_an_object(home, aged, monkeypatch):
    """Objects are renamed into tmp/ before removal, after their manifests: a crash while
    removing leaves a whole object gone and debris under tmp/gc-*, which the next gc clears."""
    s = build_store()
    with monkeypatch.context() as m:
        def crash(path, *a, **k):
            raise KeyboardInterrupt

        m.setattr(gc.shutil, "rmtree", crash)
        with pytest.raises(KeyboardInterrupt):
            gc.collect(s.store, s.registry, dry_run=False)
    assert not (s.base / "manifests" / f"{s.orphan.fingerprint}.json").exists()  # manifests went first
    assert s.store.lookup(s.orphan.fingerprint) is None
    objects = {p.name for p in (s.base / "objects").iterdir()}
    assert all(hash_tree(s.base / "objects" / h)[0] == h for h in objects)  # every object whole
    assert any(p.name.startswith("gc-") for p in (s.base / "tmp").iterdir())
    gc.collect(s.store, s.registry, dry_run=False)
    assert not any(p.name.startswith("gc-") for p in (s.base / "tmp").iterdir())
    assert_live_chain_intact(s)


def test_unreadable_roots_or_manifests_refuse(home, aged):
    s = build_store()
    before = listing(s.base)
    bad = s.base / "manifests" / f"{fingerprint(k='bad')}.json"
    bad.write_text("{ truncated")
    with pytest.raises(gc.GcRefused, match="unreadable"):
        gc.collect(s.store, s.registry, dry_run=False)
    bad.unlink()
    (s.base / "refs" / "r" / "broken.json").write_text("not json")
    with pytest.raises(gc.GcRefused, match="unreadable"):
        gc.collect(s.store, s.registry, dry_run=False)
    assert listing(s.base) == before | {s.base / "refs" / "r" / "broken.json"}


def test_remote_store_is_refused(home, monkeypatch, capsys):
    with pytest.raises(gc.GcRefused, match="local store only"):
        gc.collect(ArtifactStore(root="s3://bucket/prefix"), ModelRegistry(), dry_run=True)
    monkeypatch.setenv("CRUCIBLE_STORE", "s3://bucket/prefix")
    assert crucible(["gc", "--dry-run"]) == 2
    assert "local store only" in capsys.readouterr().err


def test_last_change_sees_a_rename_whatever_the_mtimes_say(tmp_path):
    """A published object's files may be hours old; the rename into objects/ sets its ctime,
    which nothing can set back, so it reads fresh."""
    d = tmp_path / "staging"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    old = time.time() - 3 * DAY
    for p in (d / "sub" / "f", d / "sub", d):
        os.utime(p, (old, old))
    moved = tmp_path / "obj"
    os.rename(d, moved)
    assert gc.last_change(moved) > time.time() - 60
    assert gc.size_of(moved) == 1


def test_cli_lists_then_frees(home, aged, capsys):
    s = build_store()
    aged.update(s.fresh)
    assert crucible(["gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert s.orphan.dir.exists() and str(s.orphan.dir) in out
    assert out.count("would delete") == len(s.garbage)
    total = sum(gc.size_of(p) for _, p in s.garbage)
    assert f"would free {total:,} bytes in {len(s.garbage)} entries" in out
    assert "kept         work" in out and "unfinished training" in out
    assert crucible(["gc"]) == 0
    out = capsys.readouterr().out
    assert out.count("deleted") == len(s.garbage) and f"freed {total:,} bytes" in out
    assert not s.orphan.dir.exists()
    assert crucible(["gc"]) == 0 and "nothing to collect" in capsys.readouterr().out
    assert_live_chain_intact(s)
