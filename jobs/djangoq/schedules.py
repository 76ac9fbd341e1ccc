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
    # The per-minute rollup behind the 1 h / 24 h / 7 d charts (it also holds
    # an advisory lock, so a second run at the same time writes nothing).
    {
        "name": "conveyor.roll_up",
        "func": "jobs.engine.rollup.roll_up",
        "schedule_type": Schedule.MINUTES,
        "minutes": 1,
    },
    # Folds the /metrics counter rows of backends that are gone into one row
    # per counter (it also holds an advisory lock and never waits on a writer).
    {
        "name": "conveyor.compact_counters",
        "func": "jobs.engine.counters.compact",
        "schedule_type": Schedule.MINUTES,
        "minutes": 1,
    },
]


def ensure_schedules(**_kwargs) -> None:
    for spec in SCHEDULES:
        spec = dict(spec)
        name = spec.pop("name")
        Schedule.objects.update_or_create(name=name, defaults={**spec, "repeats": -1})
