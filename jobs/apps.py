from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs import handlers  # noqa: F401 - handlers registers the built-in kinds
        from jobs.djangoq import cluster
        from jobs.djangoq.schedules import ensure_schedules
        from jobs.engine import hooks
        from jobs.webhooks.messages import FINISH_HOOK

        # The engine hears of no feature: webhooks learn of finished jobs through this hook.
        hooks.register(FINISH_HOOK)
        post_migrate.connect(ensure_schedules, sender=self)
        cluster.install()
