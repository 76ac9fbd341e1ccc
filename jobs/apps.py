from importlib import import_module

from django.apps import AppConfig, apps
from django.db.models.signals import post_migrate
from django.utils.module_loading import module_has_submodule


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs.djangoq import broker, cluster
        from jobs.djangoq.schedules import ensure_schedules
        from jobs.engine import dependencies, hooks, scheduling
        from jobs.handlers import demo  # noqa: F401 - importing a handler module registers its kinds
        from jobs.llm import handler as llm_handler  # noqa: F401
        from jobs.webhooks import handler as webhooks_handler  # noqa: F401
        from jobs.webhooks.messages import FINISH_HOOK
        from jobs.worker.runner import run_job

        # The engine hears of no feature: webhooks learn of finished jobs through this hook.
        hooks.register(FINISH_HOOK)
        # Workflows: a finished dependency queues or cancels its waiting dependents.
        hooks.register(dependencies.FINISH_HOOK)
        broker.task_function = run_job
        post_migrate.connect(ensure_schedules, sender=self)
        # Recurring schedules: code-declared ones written after migrate, and
        # a loop in each cluster that fires them (jobs/engine/scheduling.py).
        post_migrate.connect(scheduling.sync_after_migrate, sender=self, dispatch_uid="conveyor-sync-schedules")
        cluster.add_cluster_thread("conveyor-schedules", scheduling.run_ticker)
        cluster.install()
        discover_tasks()


def discover_tasks() -> None:
    """Import the `tasks` module of every installed app that has one, so the
    kinds your own apps (CONVEYOR_APPS) define register in every process:
    Daphne, each cluster and its workers, every management command. An app
    without one is skipped; an error raised while importing one (an
    ImportError inside it included) propagates, its app named."""
    for app_config in apps.get_app_configs():
        if not module_has_submodule(app_config.module, "tasks"):
            continue
        try:
            import_module(f"{app_config.name}.tasks")
        except Exception as exc:
            exc.add_note(f"while importing {app_config.name}.tasks (the job kinds of app {app_config.label!r})")
            raise
