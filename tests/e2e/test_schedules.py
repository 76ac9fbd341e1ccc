"""Schedules with real clusters: two qcluster processes tick the same
every-second schedule, and each tick submits exactly one job, within a
second of its tick."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from jobs.engine import scheduling
from jobs.models import Job, Schedule
from tests.conftest import wait_until

pytestmark = pytest.mark.processes

PREFIX = "schedule:every-second:"


def _jobs() -> list[Job]:
    return list(Job.objects.filter(idempotency_key__startswith=PREFIX).order_by("created_at"))


def test_two_clusters_submit_exactly_one_job_per_tick_within_a_second(processes):
    clusters = [processes.qcluster(), processes.qcluster()]
    for cluster in clusters:
        wait_until(
            lambda c=cluster: "schedules loop started" in processes.log_of(c),
            timeout=60,
            message="both clusters' schedule loops to start",
        )
    # The loops sleep (no schedule yet); creating one wakes them by NOTIFY.
    scheduling.create_schedule(name="every-second", kind="demo.noop", interval_seconds=1, overlap="allow")
    wait_until(lambda: len(_jobs()) >= 6, timeout=30, message=lambda: f"6 ticks' jobs, have {len(_jobs())}")
    scheduling.set_enabled("every-second", False)
    jobs = _jobs()

    keys = [job.idempotency_key for job in jobs]
    assert len(keys) == len(set(keys)), keys
    ticks = sorted(datetime.fromisoformat(key.removeprefix(PREFIX)) for key in keys)
    assert [b - a for a, b in zip(ticks, ticks[1:], strict=False)] == [timedelta(seconds=1)] * (len(ticks) - 1), ticks
    by_tick = {datetime.fromisoformat(job.idempotency_key.removeprefix(PREFIX)): job for job in jobs}
    lateness = {tick.isoformat(): (job.created_at - tick).total_seconds() for tick, job in by_tick.items()}
    assert all(0 <= late < 1.0 for late in lateness.values()), lateness
    assert Schedule.objects.get().last_job_id == by_tick[ticks[-1]].id
    # Each tick was submitted by one cluster: the logs name each job once.
    logs = "".join(processes.log_of(c) for c in clusters)
    for job in jobs:
        assert logs.count(f"submitted job {job.id}") == 1, job.idempotency_key
