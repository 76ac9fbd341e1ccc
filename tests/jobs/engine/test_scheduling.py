"""Recurring schedules: tick math (cron, interval, DST, catch-up) and firing
on a real Postgres (one job per tick, overlap skip, code schedules)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs.engine import registry, scheduling
from jobs.engine.scheduling import InvalidSchedule, next_tick, tick_due, upcoming
from jobs.models import Job, Schedule, State


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- tick math -------------------------------------------------------------------


def test_cron_ticks_are_the_next_matching_minutes_in_utc():
    after = utc(2026, 5, 4, 10, 7, 30)
    assert next_tick(cron="*/15 * * * *", after=after) == utc(2026, 5, 4, 10, 15)
    assert upcoming(cron="0 3 * * *", after=after, count=3) == [
        utc(2026, 5, 5, 3),
        utc(2026, 5, 6, 3),
        utc(2026, 5, 7, 3),
    ]


def test_a_tick_is_strictly_after_the_given_time():
    assert next_tick(cron="0 * * * *", after=utc(2026, 5, 4, 10, 0)) == utc(2026, 5, 4, 11, 0)


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("@hourly", utc(2026, 5, 4, 11)),
        ("@daily", utc(2026, 5, 5)),
        ("@weekly", utc(2026, 5, 10)),  # Sunday
        ("@monthly", utc(2026, 6, 1)),
    ],
)
def test_the_aliases(alias, expected):
    assert next_tick(cron=alias, after=utc(2026, 5, 4, 10, 7)) == expected


def test_cron_in_a_zone_follows_its_dst_changes():
    # 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST);
    # DST began on 2026-03-29.
    ticks = upcoming(cron="0 9 * * *", tz="Europe/Berlin", after=utc(2026, 3, 27, 12), count=3)
    assert ticks == [utc(2026, 3, 28, 8), utc(2026, 3, 29, 7), utc(2026, 3, 30, 7)]
    # It ends on 2026-10-25.
    ticks = upcoming(cron="0 9 * * *", tz="Europe/Berlin", after=utc(2026, 10, 24, 12), count=2)
    assert ticks == [utc(2026, 10, 25, 8), utc(2026, 10, 26, 8)]


def test_a_local_time_that_does_not_exist_on_the_spring_change_runs_once_that_day():
    # 02:30 does not exist in Berlin on 2026-03-29 (clocks jump 02:00 -> 03:00).
    ticks = upcoming(cron="30 2 * * *", tz="Europe/Berlin", after=utc(2026, 3, 27, 12), count=3)
    assert ticks == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]


def test_a_local_time_that_happens_twice_in_autumn_runs_once():
    # 02:30 happens twice in Berlin on 2026-10-25 (03:00 CEST -> 02:00 CET).
    ticks = upcoming(cron="30 2 * * *", tz="Europe/Berlin", after=utc(2026, 10, 24, 12), count=2)
    assert len(set(ticks)) == 2
    assert ticks[0].date().isoformat() == "2026-10-25"
    assert ticks[1] - ticks[0] >= timedelta(hours=24)


def test_intervals_count_from_the_previous_tick():
    anchor = utc(2026, 5, 4, 10, 0, 0)
    assert next_tick(interval_seconds=60, after=anchor, anchor=anchor) == utc(2026, 5, 4, 10, 1)
    assert next_tick(interval_seconds=60, after=utc(2026, 5, 4, 10, 0, 59, 900), anchor=anchor) == utc(
        2026, 5, 4, 10, 1
    )
    # No anchor (a new schedule): from now, cut to the whole second.
    assert next_tick(interval_seconds=5, after=utc(2026, 5, 4, 10, 0, 0, 700)) == utc(2026, 5, 4, 10, 0, 5)


def test_catching_up_after_missed_interval_ticks_lands_on_the_first_tick_after_now():
    anchor = utc(2026, 5, 4, 10, 0, 0)
    # Down for 10 minutes and 30 seconds: the next tick stays on the grid.
    assert next_tick(interval_seconds=60, after=utc(2026, 5, 4, 10, 10, 30), anchor=anchor) == utc(2026, 5, 4, 10, 11)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "@yearlyish"}, "cron"),
        ({"cron": "0 3 * * *", "interval_seconds": 5}, "cron"),
        ({}, "cron"),
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": True}, "interval_seconds"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": "0 3 * * *", "kind": "no.such.kind"}, "kind"),
        ({"cron": "0 3 * * *", "kind": "demo.sleep", "payload": {"seconds": "long"}}, "payload.seconds"),
        ({"cron": "0 3 * * *", "payload": {"unknown": 1}}, "payload.unknown"),
        ({"cron": "0 3 * * *", "overlap": "queue"}, "overlap"),
        ({"cron": "0 3 * * *", "name": "has space"}, "name"),
        ({"cron": "0 3 * * *", "priority": 5000}, "priority"),
        ({"cron": "0 3 * * *", "max_attempts": 0}, "max_attempts"),
        ({"cron": "0 3 * * *", "queue": "no spaces"}, "queue"),
    ],
)
def test_clean_refuses_each_bad_field_by_name(fields, field):
    with pytest.raises(InvalidSchedule) as caught:
        scheduling.clean({"name": "s", "kind": "demo.noop", **fields})
    assert field in [e["field"] for e in caught.value.errors], caught.value.errors


# --- firing on Postgres ------------------------------------------------------------


def make_schedule(**fields) -> Schedule:
    return scheduling.create_schedule(**{"name": "every-minute", "kind": "demo.noop", "cron": "* * * * *", **fields})


@pytest.mark.django_db
def test_a_due_schedule_submits_one_job_keyed_by_its_tick_and_moves_on():
    schedule = make_schedule(owner="apikey:7", priority=3)
    tick = schedule.next_run_at
    fired = tick_due(now=tick + timedelta(seconds=0.2))
    assert [(f.schedule, f.tick, f.outcome) for f in fired] == [("every-minute", tick, "submitted")]
    job = Job.objects.get()
    assert (job.kind, job.owner, job.priority) == ("demo.noop", "apikey:7", 3)
    assert job.idempotency_key == f"schedule:every-minute:{tick.isoformat()}"
    schedule.refresh_from_db()
    assert schedule.next_run_at == tick + timedelta(minutes=1)
    assert schedule.last_job_id == job.id
    # Nothing more is due at the same moment: firing again does nothing.
    assert tick_due(now=tick + timedelta(seconds=0.5)) == []
    assert Job.objects.count() == 1


@pytest.mark.django_db
def test_missed_ticks_run_once_on_catch_up():
    schedule = make_schedule(overlap="allow")
    first = schedule.next_run_at
    later = first + timedelta(hours=3, seconds=20)  # 180 ticks missed
    fired = tick_due(now=later)
    assert len(fired) == 1
    assert Job.objects.count() == 1
    schedule.refresh_from_db()
    assert schedule.next_run_at == first + timedelta(hours=3, minutes=1)


@pytest.mark.django_db
def test_overlap_skip_skips_a_tick_while_the_previous_job_is_unfinished_and_records_it():
    schedule = make_schedule()
    tick = schedule.next_run_at
    tick_due(now=tick)
    job = Job.objects.get()
    assert job.state == State.QUEUED
    fired = tick_due(now=tick + timedelta(minutes=1))
    assert [f.outcome for f in fired] == ["skipped"]
    schedule.refresh_from_db()
    assert schedule.skipped == 1
    assert schedule.last_skipped_at == tick + timedelta(minutes=1)
    assert schedule.next_run_at == tick + timedelta(minutes=2)
    assert Job.objects.count() == 1
    # Once the job is finished the next tick submits again.
    Job.objects.filter(id=job.id).update(state=State.SUCCEEDED)
    assert [f.outcome for f in tick_due(now=tick + timedelta(minutes=2))] == ["submitted"]
    assert Job.objects.count() == 2


@pytest.mark.django_db
def test_overlap_allow_submits_while_the_previous_job_is_unfinished():
    schedule = make_schedule(overlap="allow")
    tick = schedule.next_run_at
    tick_due(now=tick)
    tick_due(now=tick + timedelta(minutes=1))
    assert Job.objects.filter(state=State.QUEUED).count() == 2


@pytest.mark.django_db
def test_a_disabled_schedule_does_not_fire_and_enabling_it_starts_from_now():
    schedule = make_schedule(enabled=False)
    assert schedule.next_run_at is None
    assert tick_due(now=datetime.now(UTC) + timedelta(days=1)) == []
    enabled = scheduling.set_enabled("every-minute", True)
    assert enabled.next_run_at > datetime.now(UTC)


@pytest.mark.django_db
def test_a_tick_whose_kind_no_longer_validates_submits_nothing_and_says_why():
    schedule = make_schedule()
    Schedule.objects.filter(pk=schedule.pk).update(payload={"unexpected": True})
    fired = tick_due(now=schedule.next_run_at)
    assert [f.outcome for f in fired] == ["failed"]
    schedule.refresh_from_db()
    assert "payload.unexpected" in schedule.last_error
    assert schedule.next_run_at > fired[0].tick
    assert Job.objects.count() == 0


@pytest.mark.django_db
def test_run_now_submits_the_job_for_the_schedules_owner_without_moving_its_ticks():
    schedule = make_schedule(owner="apikey:9")
    job = scheduling.run_now("every-minute")
    assert job.owner == "apikey:9"
    assert job.idempotency_key is None
    schedule_after = Schedule.objects.get()
    assert schedule_after.next_run_at == schedule.next_run_at
    assert schedule_after.last_job_id == job.id


@pytest.mark.django_db
def test_names_are_unique():
    make_schedule()
    with pytest.raises(InvalidSchedule) as caught:
        make_schedule(owner="apikey:2")
    assert caught.value.errors == [{"field": "name", "message": "is already taken"}]


@pytest.mark.django_db
def test_code_schedules_are_synced_idempotently_and_removed_when_no_longer_declared():
    registry.schedule("nightly", "demo.sleep", {"seconds": 1}, cron="0 3 * * *", timezone="Europe/Berlin")
    registry.declare_for_handler("demo.noop", "@hourly")
    try:
        assert sorted(scheduling.sync_declared()) == ["demo.noop", "nightly"]
        nightly = Schedule.objects.get(name="nightly")
        assert (nightly.source, nightly.owner, nightly.timezone) == ("code", "", "Europe/Berlin")
        assert nightly.payload["seconds"] == 1
        assert Schedule.objects.get(name="demo.noop").cron == "@hourly"
        first = nightly.next_run_at
        # An operator disables it; a second start changes nothing of that.
        scheduling.set_enabled("nightly", False)
        scheduling.sync_declared()
        nightly.refresh_from_db()
        assert not nightly.enabled
        assert Schedule.objects.count() == 2
        scheduling.set_enabled("nightly", True)
        assert Schedule.objects.get(name="nightly").next_run_at == first
        # A changed declaration is written over; an undeclared one goes.
        registry.schedule("nightly", "demo.sleep", {"seconds": 2}, cron="0 4 * * *", timezone="Europe/Berlin")
        registry.forget_declared("demo.noop")
        scheduling.sync_declared()
        assert list(Schedule.objects.values_list("name", "cron")) == [("nightly", "0 4 * * *")]
    finally:
        registry.forget_declared("nightly")
        registry.forget_declared("demo.noop")


@pytest.mark.django_db
def test_an_invalid_code_schedule_is_not_synced():
    registry.schedule("broken", "demo.noop", cron="not cron")
    try:
        assert scheduling.sync_declared() == []
        assert not Schedule.objects.exists()
    finally:
        registry.forget_declared("broken")


@pytest.mark.django_db
def test_purging_the_last_job_leaves_the_schedule_without_one():
    from jobs.engine.retention import purge_finished

    schedule = make_schedule()
    tick_due(now=schedule.next_run_at)
    job = Job.objects.get()
    Job.objects.filter(id=job.id).update(state=State.SUCCEEDED, finished_at=schedule.next_run_at - timedelta(days=400))
    purge_finished()
    assert not Job.objects.exists()
    schedule.refresh_from_db()
    assert schedule.last_job_id is None


@pytest.mark.django_db
def test_migrate_writes_the_declared_schedules():
    from django.core.management import call_command

    registry.schedule("from-migrate", "demo.noop", cron="@daily")
    try:
        call_command("migrate", "jobs", verbosity=0)
        assert Schedule.objects.get(name="from-migrate").source == "code"
    finally:
        registry.forget_declared("from-migrate")
