from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs.djangoq import broker, cluster
        from jobs.djangoq.schedules import ensure_schedules
        from jobs.engine import hooks, scheduling
        from jobs.handlers import demo  # noqa: F401 - importing a handler module registers its kinds
        from jobs.llm import handler as llm_handler  # noqa: F401
        from jobs.webhooks import handler as webhooks_handler  # noqa: F401
        from jobs.webhooks.messages import FINISH_HOOK
        from jobs.worker.runner import run_job

        # The engine hears of no feature: webhooks learn of finished jobs through this hook.
        hooks.register(FINISH_HOOK)
        broker.task_function = run_job
        post_migrate.connect(ensure_schedules, sender=self)
        # Recurring schedules: code-declared ones written after migrate, and
        # a loop in each cluster that fires them (jobs/engine/scheduling.py).
        post_migrate.connect(scheduling.sync_after_migrate, sender=self, dispatch_uid="conveyor-sync-schedules")
        cluster.add_cluster_thread("conveyor-schedules", scheduling.run_ticker)
        cluster.install()
