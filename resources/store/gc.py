"""`crucible gc`: drop what nothing in a local store reaches, and nothing else.

What is live. The roots are every ref (refs/**/<stage>.json), every registry version's
fingerprint and the champion_eval artifact each promotion decision took the champion's
value from (`champion_value_from`: the decision's evidence); the live manifests are the
roots plus their whole ancestry (lineage.ancestry, the one walk of the upstream graph). An
object is live when a live manifest names its content hash, as its own bytes or as an
upstream's (kept even where that upstream's manifest is gone), or when a root names it. Two fingerprints can share bytes, so a manifest no root
reaches is garbage only together with its object: when no live manifest shares that content
hash, both go; otherwise the manifest stays too (a few hundred bytes, and a cache hit).

What is never deleted: anything live; verdicts/ (small; a re-run reports them again); the
`work/<fp>.lock` files (one a builder holds keeps two trainers apart); `work/<fp>` of a
fingerprint with no manifest yet, an unfinished training that a re-run resumes (listed as
kept, never deleted: only a `work/<fp>` whose artifact was published, debris of a crash
between publishing and cleaning up, goes); tmp/ entries changed within a day (staging of a
build in progress); anything that is not a hex-named entry the store itself writes.

Racing a build. A build publishes its object (a rename into objects/), then its manifest
(the commit point), then its ref, so for a moment an object no manifest names yet is
exactly what a build in progress looks like. Hence the grace period: an object or manifest
is deleted only when unreferenced AND unchanged for `grace_seconds` (default 1 hour), where
"changed" is the newest mtime or ctime of it and everything under it (a rename sets the
ctime, and nothing can set a ctime back, so a published object reads fresh however old its
files are), and a manifest changed within the grace period protects the object it names.
Roots are read before manifests, manifests before objects, so whatever is published while gc
reads is newer than what it has read and falls under the grace period. Besides, a real run
refuses (GcRefused) while any `work/<fp>.lock` is held, i.e. while a local build runs; a dry
run says so. What this does not cover, stated plainly: a run that is between two steps and
was handed an artifact whose ref another run moved since (an unreferenced, old artifact
still in use), and a build whose bytes equal an old unreferenced object (its rename finds
the object there and keeps it) in the moment between that rename and its manifest. Both
need concurrent runs of one recipe; run gc when no job runs to rule them out.

Deleting. Manifests go first, then their objects, so a crash never leaves a manifest whose
bytes are gone (which a re-run would take for a cache hit); an object is renamed into
tmp/gc-<hash>-<uuid> and only then removed, so a crash never leaves half an object under
objects/ (the next gc clears its own tmp/gc-* leftovers). Then the shared copies under
files/ that no object links any more (link count 1, checked again just before each goes;
a build racing gc re-adds a copy it finds gone, and an object's own link keeps its bytes
whatever happens to files/). Sizes are bytes freed: a shared file counts once, on its own
`file` line. A remote store (a URL root) is refused: gc works on a local store only.

The functions here return data; `crucible gc` (crucible_jobs/cli.py) prints it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from resources.store import lineage
from resources.store.artifact_store import ArtifactRef, ArtifactStore, is_url
from resources.store.registry import ModelRegistry

GRACE_SECONDS = 3600.0  # objects and manifests younger than this are never collected
TMP_AGE_SECONDS = 86400.0  # tmp/ entries younger than this may be a build's staging
TRASH_PREFIX = "gc-"  # tmp/gc-*: objects this collector was removing (a build's staging is a bare uuid)

_HEX = re.compile(r"[0-9a-f]{1,64}")


class GcRefused(RuntimeError):
    """gc will not run on this store now (a remote store, a build in progress, an unreadable
    root or manifest); the message says why."""


class Item(NamedTuple):
    kind: str  # object | manifest | file (a shared file no object links any more) | work | tmp
    path: Path
    size: int  # bytes
    note: str = ""  # why it is kept (kept items only)


@dataclass
class Report:
    garbage: list[Item] = field(default_factory=list)  # what goes (dry run) or went
    kept: list[Item] = field(default_factory=list)  # worth knowing about, kept, with why
    building: list[str] = field(default_factory=list)  # fingerprints whose build holds its lock now
    live_manifests: int = 0
    live_objects: int = 0

    @property
    def total(self) -> int:
        return sum(i.size for i in self.garbage)


def last_change(path: Path) -> float:
    """Newest mtime or ctime of `path` and everything under it (links not followed)."""
    st = path.lstat()
    newest = max(st.st_mtime, st.st_ctime)
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                newest = max(newest, st.st_mtime, st.st_ctime)
    return newest


def size_of(path: Path) -> int:
    """Bytes that deleting `path` frees: a file shared through files/ (more than one link)
    is counted once, as its own `file` item when its last object goes."""
    if not path.is_dir() or path.is_symlink():
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size if st.st_nlink == 1 else 0
    return total


def unshared_files(base: Path, doomed: list[Item]) -> list[Item]:
    """Entries of files/ that no object links once `doomed` objects are gone."""
    doomed_links = Counter(st.st_ino for item in doomed for p in item.path.rglob("*")
                           if p.is_file() and (st := p.lstat()).st_nlink > 1)
    items = []
    for path in _entries(base / "files"):
        st = path.lstat()
        if st.st_nlink - 1 - doomed_links[st.st_ino] <= 0:
            items.append(Item("file", path, st.st_size))
    return items


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def builds_in_progress(base: Path) -> list[str]:
    """Fingerprints whose `work/<fp>.lock` some process holds (ArtifactStore.build_once holds
    it for the whole build, staging included). Probed with a shared non-blocking lock,
    released at once; a lock file nobody holds (a failed build's) does not count."""
    held = []
    for lock_path in _entries(base / "work"):
        if lock_path.suffix != ".lock" or not _HEX.fullmatch(lock_path.stem):
            continue
        try:
            with open(lock_path) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(lock_path.stem)
        except FileNotFoundError:  # its build just finished
            pass
    return held


def roots(store: ArtifactStore, registry: ModelRegistry) -> list[tuple[str, str, str]]:
    """(fingerprint, content_hash, where) of every ref, every registry version and every
    champion_eval a promotion decision compared with."""
    found = []
    for path in sorted((store.base / "refs").rglob("*.json")):
        try:
            ref = ArtifactRef.model_validate_json(path.read_text())
        except Exception as e:  # a root gc cannot read could be keeping anything alive
            raise GcRefused(f"ref {path} is unreadable ({e}); fix or remove it before gc") from e
        found.append((ref.fingerprint, ref.content_hash, str(path)))
    try:
        models = registry.models()
    except Exception as e:
        raise GcRefused(f"registry {registry.base / 'registry.json'} is unreadable ({e})") from e
    for name, model in sorted(models.items()):
        for v in model["versions"]:
            found.append((v["fingerprint"], v.get("content_hash", ""), f"{name}:{v['version']}"))
            source = v.get("decision", {}).get("champion_value_from", {})
            if source.get("source") == "champion_eval":
                found.append((source["fingerprint"], source["data_version"], f"{name}:{v['version']}'s decision"))
    return found


def live(store: ArtifactStore, registry: ModelRegistry) -> tuple[set[str], set[str]]:
    """(live fingerprints, live content hashes): the roots and their whole ancestry."""
    fps: set[str] = set()
    hashes: set[str] = set()
    for fp, content_hash, where in roots(store, registry):
        hashes.add(content_hash)
        if fp in fps:  # its ancestry is in already: an ancestry walk takes in everything upstream
            continue
        try:
            chain = lineage.ancestry(store, fp)
        except Exception as e:  # an unreadable manifest in a live chain: refuse, never guess
            raise GcRefused(f"the lineage of {where} (fingerprint {fp}) cannot be read ({type(e).__name__}: {e})") from e
        for m in chain:
            fps.add(m["fingerprint"])
            hashes.add(m["content_hash"])
            hashes.update(u["content_hash"] for u in m["upstream"])
    hashes.discard("")
    return fps, hashes


def plan(store: ArtifactStore, registry: ModelRegistry, *, grace_seconds: float = GRACE_SECONDS,
         tmp_age_seconds: float = TMP_AGE_SECONDS, now: float | None = None) -> Report:
    """What a collection would delete, and what it keeps that is worth knowing about."""
    if is_url(store.location):
        raise GcRefused(f"the store is remote ({store.location}); crucible gc works on a local store only "
                        "(this machine's cache of a remote store is not collected either)")
    base = store.base
    now = time.time() if now is None else now
    report = Report(building=builds_in_progress(base))
    live_fps, live_hashes = live(store, registry)  # roots first: anything published later is fresh

    def fresh(path: Path) -> bool:
        try:
            return last_change(path) > now - grace_seconds
        except FileNotFoundError:  # went meanwhile (another gc): nothing to delete, so keep
            return True

    by_hash: dict[str, list[Path]] = {}  # content hash -> manifests no root reaches
    protected = set(live_hashes)
    for path in _entries(base / "manifests"):
        fp = path.name.removesuffix(".json")
        if not path.name.endswith(".json") or not _HEX.fullmatch(fp):
            continue  # an atomic write's temp file, or not ours
        try:
            content_hash = json.loads(path.read_text())["content_hash"]
        except FileNotFoundError:
            continue
        except Exception as e:  # its object could be deleted from under it
            raise GcRefused(f"manifest {path} is unreadable ({type(e).__name__}: {e}); fix or remove it before gc") from e
        if fp in live_fps or fresh(path):
            protected.add(content_hash)
        else:
            by_hash.setdefault(content_hash, []).append(path)
    report.live_manifests = len(live_fps)

    objects = {p.name: p for p in _entries(base / "objects") if p.is_dir() and _HEX.fullmatch(p.name)}
    report.live_objects = len(set(objects) & protected)
    doomed_objects = []
    for content_hash, obj in objects.items():
        if content_hash in protected:
            continue
        if fresh(obj):
            report.kept.append(Item("object", obj, size_of(obj), f"unreferenced, but changed within {grace_seconds / 3600:g} h: "
                                                                 "a build may be publishing it"))
            continue
        doomed_objects.append(Item("object", obj, size_of(obj)))
    gone = {i.path.name for i in doomed_objects}
    for content_hash, paths in sorted(by_hash.items()):
        if content_hash in protected:  # a live or fresh manifest shares these bytes: the manifest stays with them
            continue
        if content_hash in gone or content_hash not in objects:  # with its object, or its object is gone already
            report.garbage += [Item("manifest", p, p.stat().st_size) for p in paths]
    report.garbage += doomed_objects + unshared_files(base, doomed_objects)

    for path in _entries(base / "work"):
        if not path.is_dir() or not _HEX.fullmatch(path.name):
            continue
        if (base / "manifests" / f"{path.name}.json").exists() and not fresh(path):
            report.garbage.append(Item("work", path, size_of(path)))  # published: its resumable saves are debris
        elif not (base / "manifests" / f"{path.name}.json").exists():
            report.kept.append(Item("work", path, size_of(path), "unfinished training: a re-run resumes it"))

    for path in _entries(base / "tmp"):
        if path.name.startswith(TRASH_PREFIX):
            report.garbage.append(Item("tmp", path, size_of(path)))  # an interrupted gc's own leftovers
        elif last_change(path) <= now - tmp_age_seconds and not report.building:
            report.garbage.append(Item("tmp", path, size_of(path)))
        else:
            report.kept.append(Item("tmp", path, size_of(path), "staging of a build in progress" if report.building
                                    else f"changed within {tmp_age_seconds / 3600:g} h: may be a build's staging"))
    return report


def collect(store: ArtifactStore, registry: ModelRegistry, *, dry_run: bool = True, grace_seconds: float = GRACE_SECONDS,
            tmp_age_seconds: float = TMP_AGE_SECONDS, now: float | None = None) -> Report:
    """`plan`, then (unless `dry_run`) delete it: manifests, then objects (renamed into tmp/
    first), then the rest. The report's garbage is then what was deleted; an entry that
    vanished meanwhile (another gc) or an object changed since it was planned is left out."""
    report = plan(store, registry, grace_seconds=grace_seconds, tmp_age_seconds=tmp_age_seconds, now=now)
    if dry_run:
        return report
    if report.building:
        raise GcRefused(f"a build is in progress (work/<fingerprint>.lock held for {', '.join(report.building)}); "
                        "nothing deleted: run gc again when no job is running")
    now = time.time() if now is None else now
    order = {"manifest": 0, "object": 1, "file": 2, "work": 3, "tmp": 4}
    deleted = []
    for item in sorted(report.garbage, key=lambda i: order[i.kind]):
        if item.kind == "manifest":
            try:
                item.path.unlink()
            except FileNotFoundError:
                continue
        elif item.kind == "file":
            try:  # a build may have linked it again since the plan: then it stays
                if item.path.lstat().st_nlink > 1:
                    continue
                item.path.unlink()
            except FileNotFoundError:
                continue
        else:
            if item.kind == "object":
                try:
                    if last_change(item.path) > now - grace_seconds:
                        continue  # touched since it was planned: a writer is using it again
                except FileNotFoundError:
                    continue
            if not _remove_tree(item.path, store.base / "tmp"):
                continue
        deleted.append(item)
    report.garbage = deleted
    return report


def _remove_tree(path: Path, tmp: Path) -> bool:
    """Rename into tmp/ (one step: the entry is whole or gone), then remove; False if it was gone."""
    if path.parent == tmp and path.name.startswith(TRASH_PREFIX):
        trash = path
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        trash = tmp / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
    return True
