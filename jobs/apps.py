from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs import cluster, handlers  # noqa: F401 - handlers registers the built-in kinds
        from jobs.schedules import ensure_schedules

        post_migrate.connect(ensure_schedules, sender=self)
        cluster.install()
