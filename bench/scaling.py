"""`python -m bench.scaling [--quick] [--output PATH]`: what training costs as the model and
the sequence grow. For Llama models of about 3M, 10M, 40M and 120M parameters and sequence
lengths 128, 512 and 2048 (the same tokens per step, so the batch shrinks as sequences
grow), one SFT step of ours and of TRL's SFTTrainer as an expert configures it (the
probe's precision, padding-free, no gradient checkpointing): tokens/s (median step after a
warm-up step), peak RSS of the process, and the bytes one checkpoint of ours takes in the
store (weights stored once) against the same files as copies. Each cell runs in its own
process, so its peak RSS is its own. Writes bench/SCALING.md and bench/scaling.png."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, intermediate
    "3M": (256, 4, 4, 688),
    "10M": (384, 6, 6, 1024),
    "40M": (512, 12, 8, 1376),
    "120M": (768, 16, 12, 2048),
}
SEQ_LENS = (128, 512, 2048)
TOKENS_PER_STEP = 4096
STEPS = {"3M": 4, "10M": 4, "40M": 3, "120M": 2}  # timed steps after the warm-up (120M: a few only)
QUICK = {"sizes": ("3M",), "seq_lens": (128,), "steps": 1}


def sequences(seq_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(seq_len)] for _ in range(max(TOKENS_PER_STEP // seq_len, 1))]


def ours(model_dir: Path, batch: list[list[int]], steps: int) -> dict:
    from resources.backends.local.backend import LocalTorchBackend
    from resources.backends.types import AdamParams, Datum
    from resources.store.artifact_store import ArtifactStore

    client = LocalTorchBackend().create_training_client(model_dir, lora_rank=0, seed=0)
    data = [Datum.from_sequence(s, [1.0] * len(s)) for s in batch]
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=1e-4))
        times.append(time.perf_counter() - started)

    def save(out: Path) -> None:  # what a checkpoint artifact holds: the model, and the state to resume
        client.save_weights_for_sampler(out / "model")
        client.save_state(out / "state")
    store = ArtifactStore(root=tempfile.mkdtemp(prefix="scaling_store_"))
    ref = store.write("bench/checkpoint", "0" * 32, save, {"config": {}, "upstream": []})
    stored, copies = disk_bytes(ref.dir)
    return {"seconds_per_step": statistics.median(times[1:]), "store_bytes": stored, "copies_bytes": copies,
            "precision": "bf16" if client.bf16 else "fp32"}


def disk_bytes(root: Path) -> tuple[int, int]:
    """Bytes the files under `root` take on disk (hard links to one file counted once) and
    what they would take as separate copies."""
    stats = [p.stat() for p in root.rglob("*") if p.is_file()]
    return sum({s.st_ino: s.st_size for s in stats}.values()), sum(s.st_size for s in stats)


def trl(model_dir: Path, batch: list[list[int]], steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.rows.common import hf_model, trl_expert
    from resources.hf_io import load_tokenizer

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            self.started = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            times.append(time.perf_counter() - self.started)

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="scaling_trl_"), use_cpu=True, report_to="none", save_strategy="no",
                     max_steps=steps + 1, learning_rate=1e-4, logging_steps=10**6, disable_tqdm=True, seed=0,
                     per_device_train_batch_size=len(batch), dataloader_drop_last=True,
                     **trl_expert(padding_free=True, max_length=None))
    trainer = SFTTrainer(model=hf_model(model_dir), args=args, train_dataset=Dataset.from_list([{"input_ids": s} for s in batch]),
                         processing_class=load_tokenizer(model_dir), callbacks=[StepTimer()])
    trainer.train()
    return {"seconds_per_step": statistics.median(times[1:])}


def cell(size: str, seq_len: int, side: str, steps: int, root: Path) -> dict:
    """One measurement, in this process: the caller runs each in a fresh one."""
    from bench.__main__ import quiet
    from crucible_assets.base import build_tiny_llama, train_tokenizer

    quiet()
    hidden, layers, heads, intermediate = SIZES[size]
    if not (root / "tokenizer").exists():
        train_tokenizer(root / "tokenizer", 1024, 0)
    model_dir = root / f"model_{size}"
    if not model_dir.exists():
        build_tiny_llama(root / "tokenizer", model_dir, hidden, layers, heads, intermediate, max(SEQ_LENS), 0)
    from transformers import AutoConfig

    batch = sequences(seq_len, AutoConfig.from_pretrained(model_dir).vocab_size)
    result = (ours if side == "ours" else trl)(model_dir, batch, steps)
    return result | {"tokens_per_s": len(batch) * seq_len / result["seconds_per_step"],
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_cell(size: str, seq_len: int, side: str, steps: int, root: Path) -> dict:
    # TMPDIR under root: a cell's store and TRL output (a 120M checkpoint is over 1 GB) go when root goes
    done = subprocess.run([sys.executable, "-m", "bench.scaling", "--cell", size, str(seq_len), side, str(steps), str(root)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          env=os.environ | {"TMPDIR": str(root)})
    if done.returncode != 0:
        raise RuntimeError(f"cell {size} {seq_len} {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parameters(root: Path, size: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(root / f"model_{size}" / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seq_len in sorted({r["seq_len"] for r in rows}):
        for side, style in (("ours", "-o"), ("trl", "--s")):
            pts = [(r["parameters"], r[f"{side}_tokens_per_s"]) for r in rows if r["seq_len"] == seq_len]
            ax.plot(*zip(*pts), style, label=f"{'ours' if side == 'ours' else 'TRL expert'}, seq {seq_len}")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="training tokens/s", title="SFT throughput as work grows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict], machine: str, seconds: float, command: str) -> str:
    out = ["# Crucible scaling results", "", f"Command: `{command}` ({seconds:.0f} s). Machine: {machine}.", "",
           f"One SFT step of {TOKENS_PER_STEP} tokens (batch = {TOKENS_PER_STEP} / sequence length) on Llama models of "
           "growing size; ours against TRL's SFTTrainer as an expert configures it. Store bytes: one checkpoint of ours "
           "(model and resumable state) in the store, each file once, against the same files as copies.", "",
           "![throughput](scaling.png)", "",
           "| model | parameters | seq | batch | precision | ours tokens/s | TRL tokens/s | ratio | ours peak RSS MB "
           "| TRL peak RSS MB | store MB | as copies MB |",
           "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['size']} | {r['parameters']:,} | {r['seq_len']} | {r['batch']} | {r['precision']} | "
                   f"{r['ours_tokens_per_s']:.0f} | {r['trl_tokens_per_s']:.0f} | {r['ours_tokens_per_s'] / r['trl_tokens_per_s']:.2f} | "
                   f"{r['ours_peak_rss_mb']:.0f} | {r['trl_peak_rss_mb']:.0f} | {r['store_bytes'] / 1e6:.1f} | "
                   f"{r['copies_bytes'] / 1e6:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--cell":
        size, seq_len, side, steps, root = argv[1:6]
        print(json.dumps(cell(size, int(seq_len), side, int(steps), Path(root))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one small cell: the harness only")
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("SCALING.md"))
    args = p.parse_args(argv)
    from bench.machine import machine_info
    from bench.report import update_scaling, write

    sizes, seq_lens = (QUICK["sizes"], QUICK["seq_lens"]) if args.quick else (tuple(SIZES), SEQ_LENS)
    scratch = tempfile.TemporaryDirectory(prefix="bench_scaling_")  # models and every cell's files, removed at exit
    root, started, rows = Path(scratch.name), time.perf_counter(), []
    for size in sizes:
        for seq_len in seq_lens:
            steps = QUICK["steps"] if args.quick else STEPS[size]
            ours_cell, trl_cell = (run_cell(size, seq_len, side, steps, root) for side in ("ours", "trl"))
            rows.append({"size": size, "parameters": parameters(root, size), "seq_len": seq_len,
                         "batch": max(TOKENS_PER_STEP // seq_len, 1), "precision": ours_cell["precision"],
                         "ours_tokens_per_s": ours_cell["tokens_per_s"], "trl_tokens_per_s": trl_cell["tokens_per_s"],
                         "ours_peak_rss_mb": ours_cell["peak_rss_mb"], "trl_peak_rss_mb": trl_cell["peak_rss_mb"],
                         "store_bytes": ours_cell["store_bytes"], "copies_bytes": ours_cell["copies_bytes"]})
            r = rows[-1]
            print(f"{size} seq {seq_len}: ours {r['ours_tokens_per_s']:.0f} tok/s, TRL {r['trl_tokens_per_s']:.0f} tok/s, "
                  f"RSS {r['ours_peak_rss_mb']:.0f} / {r['trl_peak_rss_mb']:.0f} MB", flush=True)
    info = machine_info(0.2)
    machine = f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    command = "python -m bench.scaling" + (" --quick" if args.quick else "")
    write(args.output, markdown(rows, machine, time.perf_counter() - started, command))
    plot(rows, args.output.with_name("scaling.png"))
    update_scaling(args.output.with_name("RESULTS.md"), args.output)
    print(f"wrote {args.output} and scaling.png (and RESULTS.md's Scaling section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
