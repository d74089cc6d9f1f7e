"""Side-by-side benchmarks: Crucible's training paths against TRL and plain transformers on
the same tiny model and data. `python -m bench` prints ratios and writes bench/RESULTS.md."""
