from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs.djangoq import broker, cluster
        from jobs.djangoq.schedules import ensure_schedules
        from jobs.engine import dependencies, hooks
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
        cluster.install()
