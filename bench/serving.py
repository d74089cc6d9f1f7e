"""`python -m bench.serving [--requests 64] [--max-tokens 48] [--output PATH]`: what
`crucible serve`'s continuous batching buys. The bench's ~10M-parameter Llama (bench/workload.py)
is published into a scratch store and registry as bench:1 (and a second version, bench:2),
served by uvicorn in this process, and sent the same chat requests three ways through the
`openai` client: one at a time, all at once, and as a stream of arrivals (four times the
one-at-a-time rate) while the champion alias moves to bench:2 after a third of them. Prints and writes requests/s, p50/p99 latency, completion
tokens/s, mean rows per decode step and failed requests (bench/SERVING.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

SEED_QUESTIONS = 64


def publish(store, registry, name: str, model_dir: Path, fingerprint: str) -> dict:
    """A model dir as a registered version, without training (a bench or test fixture)."""
    ref = store.write(f"{name}/registered_model", fingerprint, lambda out: shutil.copytree(model_dir, out, dirs_exist_ok=True), {})
    return registry.register(name, {"fingerprint": ref.fingerprint, "content_hash": ref.content_hash, "path": ref.path}, gate={})


def perturbed(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """The same architecture with other weights: a second version that answers differently."""
    import torch

    from resources.hf_io import load_model, load_tokenizer

    model = load_model(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def start_server(app) -> tuple[str, object, threading.Thread]:
    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return base, server, thread
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def health_version(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/health").json()["model_version"]


def batch_rows(base: str) -> tuple[float, float]:
    """(sum, count) of the rows-per-decode-step histogram."""
    import httpx

    text = httpx.get(f"{base}/metrics").text
    return tuple(float(re.search(rf"^crucible_serve_batch_rows_{k} (\S+)$", text, re.M).group(1)) for k in ("sum", "count"))


async def send(base: str, questions: list[str], max_tokens: int, concurrent: bool, gap: float = 0.0, move=None) -> dict:
    """Sequential, or concurrent with arrivals `gap` seconds apart; `move()` runs once a third
    of the requests were sent, and the sends go on once the server reports the new version."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies, tokens, versions, failures = [], 0, {}, 0

    async def ask(i: int, q: str):
        nonlocal tokens, failures
        t0 = time.perf_counter()
        try:
            r = await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": q}],
                                                     max_tokens=max_tokens, temperature=0.7, seed=i)
        except openai.OpenAIError:
            failures += 1
            return
        latencies.append(time.perf_counter() - t0)
        tokens += r.usage.completion_tokens
        versions[r.model_extra["model_version"]] = versions.get(r.model_extra["model_version"], 0) + 1

    rows_before = batch_rows(base)
    t0 = time.perf_counter()
    if concurrent:
        tasks = []
        for i, q in enumerate(questions):
            tasks.append(asyncio.create_task(ask(i, q)))
            await asyncio.sleep(gap)
            if move and i == len(questions) // 3:
                before = await asyncio.to_thread(health_version, base)
                await asyncio.to_thread(move)
                while await asyncio.to_thread(health_version, base) == before:
                    await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    else:
        for i, q in enumerate(questions):
            await ask(i, q)
    wall = time.perf_counter() - t0
    await client.close()
    rows_after = batch_rows(base)
    steps = rows_after[1] - rows_before[1]
    latencies.sort()
    return {"requests/s": len(latencies) / wall, "p50 s": statistics.median(latencies),
            "p99 s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "tokens/s": tokens / wall, "rows/step": (rows_after[0] - rows_before[0]) / steps if steps else 0.0,
            "failed": failures, "versions": versions, "wall s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("SERVING.md"))
    args = p.parse_args(argv)

    from bench.__main__ import quiet
    from bench.machine import machine_info
    from bench.workload import build_workload
    from crucible_jobs.serving.server import build
    from resources.backends.local.backend import LocalTorchBackend
    from resources.datasets.synthetic import arithmetic_conversations
    from resources.store.artifact_store import ArtifactStore
    from resources.store.registry import ModelRegistry

    quiet()
    machine = machine_info(0.5)
    precision = LocalTorchBackend(precision=args.precision).resolved_precision()
    scratch = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    try:
        workload = build_workload(scratch / "workload", num_chats=2, num_pairs=2, num_problems=2)
        store, registry = ArtifactStore(root=str(scratch / "store")), ModelRegistry(root=str(scratch / "registry"))
        publish(store, registry, "bench", workload.model_dir, "a" * 64)
        registry.promote("bench:1", "champion", "bench")
        publish(store, registry, "bench", perturbed(workload.model_dir, scratch / "v2"), "b" * 64)
        os.environ["CRUCIBLE_HOME"] = str(scratch / "home")  # the response log
        app = build("bench", precision=args.precision, max_rows=args.requests, poll_seconds=0.2, registry=registry, store=store)
        base, server, thread = start_server(app)
        questions = [c["messages"][0]["content"] for c in arithmetic_conversations(args.requests, 0)]
        asyncio.run(send(base, questions[:4], args.max_tokens, concurrent=True))  # warm-up
        one = asyncio.run(send(base, questions, args.max_tokens, concurrent=False))
        together = asyncio.run(send(base, questions, args.max_tokens, concurrent=True))
        gap = one["wall s"] / len(questions) / 4  # arrivals four times faster than one-at-a-time service
        moving = asyncio.run(send(base, questions, args.max_tokens, concurrent=True, gap=gap,
                                  move=lambda: registry.promote("bench:2", "champion", "bench: move under load")))
        server.should_exit = True
        thread.join(timeout=30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"# crucible serve: continuous batching ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}. Model: the bench's "
             f"{workload.parameters / 1e6:.1f}M-parameter Llama (bench/workload.py), untrained, {precision} ({args.precision}). "
             f"{args.requests} chat requests (arithmetic questions), max_tokens {args.max_tokens}, temperature 0.7, "
             "seeded per request, through the `openai` client.", "",
             "| mode | requests/s | p50 latency s | p99 latency s | completion tokens/s | rows per decode step | failed | versions |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in [("one at a time", one), ("all at once", together), (f"arriving every {gap * 1000:.0f} ms, champion moved after a third", moving)]:
        lines.append(f"| {name} | {r['requests/s']:.2f} | {r['p50 s']:.2f} | {r['p99 s']:.2f} | {r['tokens/s']:.0f} | "
                     f"{r['rows/step']:.1f} | {r['failed']} | {', '.join(f'{v}: {n}' for v, n in sorted(r['versions'].items()))} |")
    lines += ["", f"Batching gain: {together['requests/s'] / one['requests/s']:.2f}x requests/s "
                  f"({together['tokens/s'] / one['tokens/s']:.2f}x tokens/s); "
                  f"p50 latency {together['p50 s'] / one['p50 s']:.2f}x of one at a time.", ""]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
