"""Where training steps run on a cluster. Every checkpoint asset joins the `gpu` concurrency
pool (its limit, set in the instance's dagster.yaml, caps training steps across all runs),
carries a `dagster-k8s/config` tag that k8s_job_executor turns into the step pod's GPU
request, and goes to the `gpu` queue of a Celery cluster. All are inert on one machine: no
pool limit is set by default and the in-process executor ignores the tags.
CRUCIBLE_GPUS_PER_TRAINING_STEP (read where the code location loads) sizes the request;
match it with the checkpoint's `nproc_per_node`."""

import os

GPUS_PER_TRAINING_STEP = os.environ.get("CRUCIBLE_GPUS_PER_TRAINING_STEP", "1")

TRAINING_STEP = {
    "pool": "gpu",
    "op_tags": {
        "dagster-k8s/config": {"container_config": {"resources": {
            "requests": {"nvidia.com/gpu": GPUS_PER_TRAINING_STEP},
            "limits": {"nvidia.com/gpu": GPUS_PER_TRAINING_STEP},
        }}},
        "dagster-celery/queue": "gpu",
    },
}
