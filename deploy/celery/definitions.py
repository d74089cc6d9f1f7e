"""Crucible's code location for a Celery cluster (dagster-celery): steps are queued on a
broker and run by workers on any machine; training steps carry the `gpu` pool and go to the
workers that listen on the `gpu` queue.

    pip install -e '.[celery]'
    dagster-celery worker start -A dagster_celery.app -y deploy/celery/celery.yaml -q dagster     # CPU hosts
    dagster-celery worker start -A dagster_celery.app -y deploy/celery/celery.yaml -q gpu         # GPU hosts
    dagster code-server start -m deploy.celery.definitions

A host that serves both queues passes them in one argument, `-q dagster,gpu` (dagster-celery
turns each `-q` into its own celery `-Q`, and celery keeps only the last).

Workers share state as on Kubernetes: CRUCIBLE_STORE=s3://..., deploy/dagster.yaml in
DAGSTER_HOME, CRUCIBLE_HOME on a shared volume. A sweep's points fan out over the workers with

    crucible sweep run examples/sweep_sl_basic.yaml --module deploy.celery.definitions \
        -c deploy/celery/celery.yaml --parallel 4

(tests/test_celery_sweep.py runs this with a local Redis broker and two workers.)
"""

from dagster_celery import celery_executor

from crucible_jobs.definitions import build_defs

defs = build_defs(celery_executor)
