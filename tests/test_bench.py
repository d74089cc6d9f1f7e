"""The benchmark harness end to end on its smoke plan: rows that need no TRL (CI installs
only the test extra), a table on stdout and a RESULTS.md with the machine and the targets."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_bench_writes_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--rows", "sampling,tokenization", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for expected in ("peak_fp32_flops", "peak_bf16_flops", "torch_threads", "| Sampling |", "| Tokenization |",
                     ">= 2", ">= 1", "ours tokens/s", "batched generate tokens/s", "datasets.map rows/s"):
        assert expected in text, expected
    assert "| Sampling |" in done.stdout


def test_unknown_row_is_refused():
    done = subprocess.run([sys.executable, "-m", "bench", "--rows", "sft,nope"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "nope" in done.stderr


def test_quick_scaling_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "SCALING.md"
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n## Scaling\n\nNot measured yet.\n\n## Plan\n\n- reps: 1\n")
    done = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 3M |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, trl, store_mb, copies_mb = float(cells[5]), float(cells[6]), float(cells[10]), float(cells[11])
    assert ours > 0 and trl > 0
    assert store_mb < copies_mb  # the checkpoint's weights are stored once, not as model/ and state/ copies
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    updated = results.read_text()  # RESULTS.md beside it carries the same table in its Scaling section
    assert row in updated and "Not measured yet" not in updated and updated.endswith("## Plan\n\n- reps: 1\n")


def test_tokenization_reference_makes_our_artifact(tmp_path):
    """The Tokenization row races a reference producing the same artifact: on the row's chats,
    untruncated and truncated, its ids are our tokens and its assistant masks our nonzero
    loss weights."""
    import json

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from bench.rows.tokenization import datasets_reference
    from bench.workload import mixed_chats
    from crucible_assets.base import train_tokenizer
    from crucible_assets.tokenizing import tokenize_splits

    train_tokenizer(tmp_path / "tok", 1024, 0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    chats = mixed_chats(200, seed=1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[1:]))
    (data / "test.jsonl").write_text(json.dumps(chats[0]) + "\n")
    for max_length in (128, 60):  # the row's, and one that truncates some chats without emptying any
        ours, reference = tmp_path / f"ours{max_length}", tmp_path / f"reference{max_length}"
        ours.mkdir()
        reference.mkdir()
        summary = tokenize_splits(data, ours, tok, "conversations", max_length, "all_assistant_messages", "chat_template",
                                  overlong="error")
        datasets_reference(tok, data, reference, max_length)
        assert (summary["train_truncated"] > 0) == (max_length == 60)
        for split in ("train", "test"):
            rows, want = (pq.read_table(d / f"{split}.parquet").to_pylist() for d in (ours, reference))
            assert [r["tokens"] for r in rows] == [w["input_ids"] for w in want]
            assert [[int(x > 0) for x in r["weights"]] for r in rows] == [w["assistant_masks"] for w in want]
