"""SIGKILL campaign for test_reliability: run as `python fault_worker.py SPEC.json`.

Importing torch and transformers costs seconds on two busy cores, so this process imports
once and forks a child per run; it never runs a torch op itself, so each child starts with
a fresh thread pool. A run is the checkpoint asset's real write path: `store.write` whose
build trains with resumable saves in the store's work dir (train_sft) and writes the
checkpoint (save_checkpoint), then `set_latest`. Each trial kills a run with SIGKILL, either
after a seeded random delay or just before its k-th filesystem operation (open for writing,
mkdir, rename, replace, fsync, rmtree, safetensors save), then checks that nothing partial
is visible, then lets a fresh run resume to the end. Results go to stdout as JSON.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

import resources.backends.local.client as local_torch_client
from crucible_assets.train.checkpoint import save_checkpoint
from crucible_assets.train.sft import train_sft
from crucible_assets.train.loop import TrainConfig
from resources.store.artifact_store import ArtifactStore
from resources.backends.local.backend import LocalTorchBackend

KEY = "faults/checkpoint"
FP = "f" * 32
CONFIG = TrainConfig(max_steps=8, batch_size=4, save_every=2, eval_every=4, learning_rate=3e-3, warmup_steps=2)


def materialize(spec: dict, root: Path) -> None:
    """One run of the asset, as the checkpoint stage does it (no Dagster around it)."""
    store = ArtifactStore(root=str(root))
    rows = lambda split, n: [(r["tokens"], r["weights"]) for r in pq.read_table(Path(spec["tokenized"]) / f"{split}.parquet").to_pylist()[:n]]  # noqa: E731

    def build(out: Path) -> dict:
        client = LocalTorchBackend(device="cpu", precision="fp32").create_training_client(Path(spec["base_model"]), 0, 0)
        steps, telemetry = train_sft(client, rows("train", 32), rows("test", 8), CONFIG, store.work_dir(FP), lambda _: None)
        return {**save_checkpoint(client, out, steps, telemetry, "train_mean_nll", "test/nll"),
                "resumed_from_step": telemetry["resumed_from_step"]}

    if store.lookup(FP) is None:
        store.write(KEY, FP, build, {"config": CONFIG.model_dump()})
    store.set_latest(store.lookup(FP))


def gate_io(kill_at: int | None) -> list[int]:
    """Count this process's filesystem write operations; SIGKILL it just before the
    `kill_at`-th. Returns the live counter."""
    count = [0]

    def gate(fn, writes=lambda *a, **kw: True):
        def wrapped(*args, **kwargs):
            if writes(*args, **kwargs):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    def writing(_file, mode="r", *a, **kw):
        return any(c in mode for c in "wax+")

    builtins.open = gate(builtins.open, writing)
    for name in ("rename", "replace", "fsync", "mkdir"):
        setattr(os, name, gate(getattr(os, name)))
    shutil.rmtree = gate(shutil.rmtree)
    local_torch_client.save_file = gate(local_torch_client.save_file)
    return count


def in_child(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        # one thread: every run computes identically, and on two shared cores a second
        # OpenMP thread spin-waiting made each run 5x slower
        torch.set_num_threads(1)
        code = 0
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by exit status
            print(f"child failed: {e!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    return pid


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def reference_run(spec: dict, root: Path) -> int:
    """An uninterrupted run; returns how many filesystem write operations it made."""
    counter = root.parent / "io_count"

    def counted():
        count = gate_io(None)
        materialize(spec, root)
        counter.write_text(str(count[0]))

    assert wait(in_child(counted)) == 0, "reference run failed"
    return int(counter.read_text())


def visible_state(root: Path) -> dict:
    """What a reader could see: every manifest's object must verify; refs must resolve."""
    store = ArtifactStore(root=str(root))
    problems = []
    manifests = sorted((root / "manifests").glob("*.json")) if (root / "manifests").exists() else []
    for m in manifests:
        ref = store.lookup(m.stem)
        if bad := store.verify(ref):
            problems.append(f"{m.name}: {bad}")
    refs = sorted((root / "refs").rglob("*.json")) if (root / "refs").exists() else []
    for r in refs:
        ref = store.latest(r.relative_to(root / "refs").with_suffix("").as_posix())
        if store.lookup(ref.fingerprint) is None or store.verify(ref):
            problems.append(f"ref {r.name} points at an unpublished or corrupt artifact")
    objects = len(list((root / "objects").iterdir())) if (root / "objects").exists() else 0
    return {"manifests": len(manifests), "refs": len(refs), "objects": objects, "problems": problems}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    base = Path(spec["root"])
    # warm the lazy imports here, once, so each child's time goes to the run itself
    pq.read_table(Path(spec["tokenized"]) / "test.parquet")
    import transformers.models.llama.modeling_llama  # noqa: F401
    rng = random.Random(spec["seed"])

    t0 = time.perf_counter()
    n_ops = reference_run(spec, base / "reference")
    duration = time.perf_counter() - t0
    reference = ArtifactStore(root=str(base / "reference")).lookup(FP).content_hash

    trials = []
    for i in range(spec["trials"]):
        root = base / f"trial_{i:02d}"
        if i % 2 == 0:
            how, delay = "timed", rng.uniform(0.05, 0.9 * duration)
            for _ in range(4):  # a run that beat its delay was not a fault: retry sooner
                shutil.rmtree(root, ignore_errors=True)
                pid = in_child(materialize, spec, root)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                status, where = wait(pid), f"{delay:.2f}s"
                if status == -signal.SIGKILL:
                    break
                delay /= 2
        else:
            how, k = "io_op", rng.randint(1, n_ops)
            pid = in_child(lambda: (gate_io(k), materialize(spec, root)))
            status, where = wait(pid), f"op {k}/{n_ops}"
        after_kill = visible_state(root)
        resumed_ok = wait(in_child(materialize, spec, root)) == 0
        ref = ArtifactStore(root=str(root)).lookup(FP)
        summary = ArtifactStore(root=str(root)).manifest(FP)["summary"] if ref else {}
        trials.append({"trial": i, "kill": how, "at": where, "killed": status == -signal.SIGKILL,
                       "after_kill": after_kill, "resumed_ok": resumed_ok,
                       "resumed_from_step": summary.get("resumed_from_step"),
                       "content_hash": ref.content_hash if ref else None, "final": visible_state(root)})
    print(json.dumps({"reference": reference, "io_ops": n_ops, "reference_seconds": duration, "trials": trials}))


if __name__ == "__main__":
    main()
