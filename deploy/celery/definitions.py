"""Crucible's code location for a Celery cluster (dagster-celery): steps are queued on a
broker and run by workers on any machine; training steps carry the `gpu` pool and go to the
workers that listen on the `gpu` queue.

    pip install -e '.[celery]'
    dagster-celery worker start -A dagster_celery.app -y deploy/celery/celery.yaml -q dagster     # CPU hosts
    dagster-celery worker start -A dagster_celery.app -y deploy/celery/celery.yaml -q gpu         # GPU hosts
    dagster code-server start -m deploy.celery.definitions

Workers share state as on Kubernetes: CRUCIBLE_STORE=s3://..., deploy/dagster.yaml in
DAGSTER_HOME, CRUCIBLE_HOME on a shared volume.
"""

from dagster_celery import celery_executor

from crucible_jobs.definitions import build_defs

defs = build_defs(celery_executor)
