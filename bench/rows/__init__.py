"""One module per benchmark row; each `run(workload, plan)` returns its `Row`s."""
