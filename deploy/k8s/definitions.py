"""Crucible's code location for Kubernetes: the same assets, resources and jobs, with every
step in its own pod (dagster-k8s's k8s_job_executor). Training steps request GPUs through
their `dagster-k8s/config` tag (crucible_assets/train/placement.py) and queue in the `gpu` pool.

    pip install -e '.[k8s]'
    dagster code-server start -m deploy.k8s.definitions   # or point the Helm chart's
                                                          # user deployment at this module

Pods share nothing on disk, so the deployment sets (see deploy/k8s/values.yaml):
CRUCIBLE_STORE=s3://... (artifacts), DAGSTER_HOME with deploy/dagster.yaml (PostgreSQL), and
CRUCIBLE_HOME on a ReadWriteMany volume (the model registry).
"""

from dagster_k8s import k8s_job_executor

from crucible_jobs.definitions import build_defs

defs = build_defs(k8s_job_executor)
