"""A retraining schedule per recipe, stopped by default. A scheduled run re-materializes the
recipe's chain: every asset whose inputs did not change is a cache hit, so it trains only
when the data did (a local file that was rewritten, an HF dataset without a pinned
revision, a new upstream model)."""

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from crucible_jobs.automation import automation_run_config

WEEKLY = "0 3 * * 0"  # Sundays 03:00 UTC


def recipe_schedule(recipe: str, cron: str = WEEKLY):
    @schedule(name=f"{recipe}_retrain", job_name=recipe, cron_schedule=cron, execution_timezone="UTC",
              default_status=DefaultScheduleStatus.STOPPED,
              description=f"Retrain {recipe} on its current data; run config from $CRUCIBLE_HOME/automation/{recipe}.yaml if present.")
    def _schedule(context: ScheduleEvaluationContext) -> RunRequest:
        return RunRequest(run_config=automation_run_config(recipe), tags={"crucible/trigger": "schedule"})

    return _schedule
