"""`python -m bench [--quick] [--rows sft,dpo,...] [--output PATH]`: runs the rows, prints
the table and writes RESULTS.md (default bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROWS = ("sft", "dpo", "rl", "sampling", "tokenization", "orchestration")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: one tiny repetition per row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)} (mfu comes with sft)")
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    return args


def quiet() -> None:
    """Progress bars and deprecation chatter of the libraries under test would drown the table."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    quiet()
    from bench import report
    from bench.machine import machine_info
    from bench.mfu import mfu_rows
    from bench.plan import QUICK, Plan
    from bench.workload import build_workload

    plan = QUICK if args.quick else Plan()
    scratch = tempfile.TemporaryDirectory(prefix="bench_")  # every row's temp dirs, removed at exit
    tempfile.tempdir = scratch.name
    t0 = time.perf_counter()
    machine = machine_info(plan.peak_seconds)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
          f"peaks fp32 {machine['peak_fp32_flops'] / 1e9:.1f} / bf16 {machine['peak_bf16_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    n = max(plan.sft_steps, plan.dpo_steps) * plan.batch_size
    workload = build_workload(Path(tempfile.mkdtemp(prefix="workload_")), num_chats=n, num_pairs=n,
                              num_problems=max(plan.sample_prompts, plan.rl_steps * plan.batch_size))
    rows = []
    for name in args.rows.split(","):
        print(f"running {name} ...", flush=True)
        try:
            new = importlib.import_module(f"bench.rows.{name}").run(workload, plan)
        except ModuleNotFoundError as e:
            if e.name != "trl":
                raise
            sys.exit(f"row {name} races TRL, which is not installed: pip install -c constraints-cpu.txt -e '.[bench]'")
        if name == "sft":
            new += mfu_rows(new[0], workload, machine)
        for r in new:
            print(f"  {r.name}: {r.value:.3g} (target {r.target_text})", flush=True)
        rows += new
    seconds = time.perf_counter() - t0
    command = "python -m bench" + (" --quick" if args.quick else "") + ("" if args.rows == ",".join(ROWS) else f" --rows {args.rows}")
    report.write(args.output, report.markdown(rows, machine, command, dataclasses.asdict(plan), seconds,
                                                 args.output.with_name("SCALING.md")))
    print(report.table(rows))
    print(f"wrote {args.output} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
