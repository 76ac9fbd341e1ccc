"""The engine's periodic work, as Django-Q2 schedules (created after migrate)."""

from __future__ import annotations

from django_q.models import Schedule

SCHEDULES = [
    # Catches running jobs whose lease expired and whose broker row was not
    # redelivered (for instance after the broker queue was purged).
    {
        "name": "conveyor.rescue_expired",
        "func": "jobs.worker.runner.rescue_expired",
        "schedule_type": Schedule.MINUTES,
        "minutes": 1,
    },
    {
        "name": "conveyor.purge_finished",
        "func": "jobs.engine.retention.purge_finished",
        "schedule_type": Schedule.DAILY,
    },
]


def ensure_schedules(**_kwargs) -> None:
    for spec in SCHEDULES:
        spec = dict(spec)
        name = spec.pop("name")
        Schedule.objects.update_or_create(name=name, defaults={**spec, "repeats": -1})
