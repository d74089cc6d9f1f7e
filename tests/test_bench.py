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
    done = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 3M |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, trl, store_mb, copies_mb = float(cells[5]), float(cells[6]), float(cells[10]), float(cells[11])
    assert ours > 0 and trl > 0
    assert store_mb < copies_mb  # the checkpoint's weights are stored once, not as model/ and state/ copies
    assert (tmp_path / "scaling.png").stat().st_size > 1000
