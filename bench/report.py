"""The results table on the terminal and in RESULTS.md, with the machine it ran on."""

from __future__ import annotations

from pathlib import Path

from bench.result import Row

GFLOP = 1e9


def table(rows: list[Row]) -> str:
    lines = ["| row | measure | value | target | met |", "| --- | --- | ---: | ---: | :---: |"]
    lines += [f"| {r.name} | {r.measure} | {r.value:.3g} | {r.target_text} | {'yes' if r.met else '**no**'} |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def scaling_section(scaling_md: Path) -> list[str]:
    """SCALING.md's table and plot (`python -m bench.scaling`, a separate run of about ten
    minutes) under RESULTS.md's own heading, or a line saying how to make them."""
    if not scaling_md.exists():
        return ["## Scaling", "", f"Not measured yet: run `python -m bench.scaling` (writes {scaling_md.name}).", ""]
    body = scaling_md.read_text().splitlines()[1:]  # its own title dropped
    return ["## Scaling", "", f"From {scaling_md.name}, a separate run:", *body, ""]


def update_scaling(results_md: Path, scaling_md: Path) -> None:
    """Replace RESULTS.md's Scaling section with SCALING.md's, after `python -m bench.scaling`
    (each command keeps its own part of RESULTS.md current)."""
    if not results_md.exists():
        return
    lines = results_md.read_text().splitlines()
    start = lines.index("## Scaling")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    write(results_md, "\n".join(lines[:start] + scaling_section(scaling_md) + lines[end:]) + "\n")


def markdown(rows: list[Row], machine: dict, command: str, plan: dict, seconds: float, scaling_md: Path) -> str:
    out = ["# Crucible benchmark results", "", f"Command: `{command}` ({seconds:.0f} s in all).", "",
           "Each row runs ours and the reference back to back on the same ~10M-parameter Llama (Crucible's locally "
           "trained tokenizer) and data, repetitions interleaved (order alternating), medians. Ratios above 1 mean "
           "ours is faster.", "", "## Machine", ""]
    for k, v in machine.items():
        out.append(f"- {k}: {v / GFLOP:.1f} GFLOP/s" if k.startswith("peak_") else f"- {k}: {v}")
    out += ["", "## Results", "", table(rows), "", "## Details", ""]
    for r in rows:
        out.append(f"### {r.name}")
        out.append("")
        out += [f"- {k}: {_fmt(v)}" for k, v in r.details.items()]
        if not r.met:
            out.append(f"- below target; what limits it: {r.limit}")
            if r.profile:
                out.append(f"- profile: {r.profile}")
        out.append("")
    out += scaling_section(scaling_md)
    out += ["## Plan", "", *[f"- {k}: {v}" for k, v in plan.items()], ""]
    return "\n".join(out)


def write(path: Path, text: str) -> None:
    """Temp file + rename: a crashed run never leaves half a report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
