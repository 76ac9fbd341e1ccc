"""The operators' CLI: `manage.py jobs …` and `manage.py purge_jobs`."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_q.models import OrmQ

from jobs import services
from jobs.models import Attempt, Job, JobEvent, State

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def refused(*args: str) -> str:
    with pytest.raises(CommandError) as caught:
        run(*args)
    return str(caught.value)


def put_in(job: Job, state: State, **fields) -> Job:
    Job.objects.filter(id=job.id).update(state=state, **fields)
    job.refresh_from_db()
    return job


# --- jobs submit --------------------------------------------------------------


def test_submit_prints_the_new_jobs_id():
    out = run("jobs", "submit", "demo.noop")

    job = Job.objects.get(id=out.strip())
    assert job.kind == "demo.noop"
    assert job.state == State.QUEUED
    assert job.owner == "cli"
    assert OrmQ.objects.count() == 1


def test_submit_passes_the_payload_and_options():
    out = run(
        "jobs",
        "submit",
        "demo.sleep",
        "--payload",
        '{"seconds": 2, "steps": 4}',
        "--queue",
        "llm",
        "--priority",
        "5",
        "--max-attempts",
        "7",
        "--run-after",
        (timezone.now() + timedelta(hours=1)).isoformat(),
    )

    job = Job.objects.get(id=out.strip())
    assert job.payload == {"seconds": 2.0, "steps": 4}
    assert (job.queue, job.priority, job.max_attempts) == ("llm", 5, 7)
    assert job.state == State.SCHEDULED


def test_submit_with_a_used_idempotency_key_prints_the_existing_job():
    first = run("jobs", "submit", "demo.noop", "--idempotency-key", "k1").strip()
    err = StringIO()
    out = StringIO()
    call_command("jobs", "submit", "demo.noop", "--idempotency-key", "k1", stdout=out, stderr=err)

    assert out.getvalue().strip() == first
    assert f"existing job {first}" in err.getvalue()
    assert Job.objects.count() == 1


def test_submit_refuses_a_payload_that_is_not_json():
    message = refused("jobs", "submit", "demo.noop", "--payload", "{seconds: 1")
    assert "--payload is not valid JSON" in message
    assert not Job.objects.exists()
    assert not OrmQ.objects.exists()


def test_submit_refuses_an_unknown_kind_naming_the_known_ones():
    message = refused("jobs", "submit", "demo.nope")
    assert "unknown kind 'demo.nope'" in message
    assert "demo.noop" in message
    assert not Job.objects.exists()
    assert not JobEvent.objects.exists()
    assert not OrmQ.objects.exists()


def test_submit_refuses_an_invalid_payload_naming_the_field():
    message = refused("jobs", "submit", "demo.sleep", "--payload", '{"seconds": -1}')
    assert "payload.seconds" in message
    assert not Job.objects.exists()


def test_submit_refuses_a_run_after_that_is_not_a_date():
    assert "is not an ISO 8601 date-time" in refused("jobs", "submit", "demo.noop", "--run-after", "tomorrow")
    assert "time zone" in refused("jobs", "submit", "demo.noop", "--run-after", "2030-01-01T12:00:00")
    assert not Job.objects.exists()


# --- jobs list / show / stats -------------------------------------------------


def test_list_prints_the_newest_jobs_first(make_job):
    older = make_job("demo.noop")
    Job.objects.filter(id=older.id).update(created_at=timezone.now() - timedelta(minutes=1))
    newer = make_job("demo.sleep", {"seconds": 1})

    lines = run("jobs", "list").splitlines()

    assert [line.split()[0] for line in lines] == [str(newer.id), str(older.id)]
    assert "queued" in lines[0] and "demo.sleep" in lines[0]


def test_list_filters_by_state_queue_and_kind(make_job):
    dead = put_in(make_job("demo.noop", queue="llm"), State.DEAD)
    make_job("demo.noop")
    make_job("demo.sleep", {"seconds": 1}, queue="llm")

    assert run("jobs", "list", "--state", "dead").split()[0] == str(dead.id)
    assert len(run("jobs", "list", "--queue", "llm").splitlines()) == 2
    assert len(run("jobs", "list", "--kind", "demo.noop").splitlines()) == 2
    assert run("jobs", "list", "--state", "succeeded") == ""


def test_list_refuses_an_unknown_state_or_limit():
    assert "unknown state 'done'" in refused("jobs", "list", "--state", "done")
    assert "--limit" in refused("jobs", "list", "--limit", "0")


def test_show_prints_the_job_as_json(make_job):
    job = put_in(make_job("demo.fail", {"mode": "permanent"}), State.DEAD, attempts=1, error_type="Boom")
    Attempt.objects.create(
        job=job, number=1, worker="w1", started_at=timezone.now(), outcome="failed", error_message="it broke"
    )

    data = json.loads(run("jobs", "show", str(job.id)))

    assert data["id"] == str(job.id)
    assert data["state"] == "dead"
    assert data["payload"]["mode"] == "permanent"
    assert data["error"]["type"] == "Boom"
    assert data["attempt_history"] == [{"number": 1, "outcome": "failed", "worker": "w1", "error": "it broke"}]


def test_show_refuses_an_unknown_or_malformed_id():
    assert "no job with id" in refused("jobs", "show", str(uuid.uuid4()))
    assert "no job with id" in refused("jobs", "show", "nope")


def test_stats_prints_a_row_per_queue(make_job):
    make_job("demo.noop", queue="llm")
    make_job("demo.noop", queue="llm")

    lines = run("jobs", "stats").splitlines()

    assert lines[0].split()[:6] == ["queue", "queued", "sched", "running", "retry", "dead"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"default", "llm"}
    assert rows["llm"][1] == "2"
    assert rows["default"][1:7] == ["0", "0", "0", "0", "0", "-"]


# --- jobs retry / cancel --------------------------------------------------------


def test_retry_queues_a_dead_job_again(make_job):
    job = put_in(make_job("demo.noop"), State.DEAD, attempts=5)

    assert run("jobs", "retry", str(job.id)).strip() == f"{job.id} queued"

    job.refresh_from_db()
    assert (job.state, job.attempts) == (State.QUEUED, 0)
    assert JobEvent.objects.filter(job=job).last().data["actor"] == "cli"


def test_retry_refuses_a_job_that_is_not_dead(make_job):
    job = make_job("demo.noop")
    assert "only dead or cancelled jobs can be retried" in refused("jobs", "retry", str(job.id))
    assert Job.objects.get(id=job.id).state == State.QUEUED


def test_cancel_cancels_a_queued_job(make_job):
    job = make_job("demo.noop")

    assert run("jobs", "cancel", str(job.id)).strip() == f"{job.id} cancelled"
    assert Job.objects.get(id=job.id).state == State.CANCELLED


def test_cancel_asks_a_running_job_to_stop(make_job):
    job = put_in(make_job("demo.noop"), State.RUNNING, attempts=1, lease_owner="w")

    assert run("jobs", "cancel", str(job.id)).strip() == f"{job.id} running (cancel requested)"
    assert Job.objects.get(id=job.id).cancel_requested_at is not None


def test_cancel_refuses_a_finished_job(make_job):
    job = put_in(make_job("demo.noop"), State.SUCCEEDED)
    assert "is succeeded" in refused("jobs", "cancel", str(job.id))


# --- purge_jobs -------------------------------------------------------------------


def test_purge_deletes_old_finished_jobs_and_keeps_active_and_recent_ones(make_job):
    long_ago = timezone.now() - timedelta(days=30)
    purged = []
    for state in (State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED):
        # Dead jobs are kept longer (CONVEYOR_DEAD_RETENTION_DAYS, 90).
        when = long_ago - timedelta(days=90) if state == State.DEAD else long_ago
        job = put_in(make_job("demo.noop"), state, finished_at=when, created_at=when)
        Attempt.objects.create(job=job, number=1, started_at=long_ago, finished_at=long_ago, outcome="failed")
        purged.append(job.id)
    recent = put_in(make_job("demo.noop"), State.SUCCEEDED, finished_at=timezone.now() - timedelta(days=1))
    old_but_queued = put_in(make_job("demo.noop"), State.QUEUED, created_at=long_ago)
    old_but_running = put_in(make_job("demo.noop"), State.RUNNING, created_at=long_ago)
    JobEvent.objects.create(job=None, type="system.note")
    JobEvent.objects.filter(job=None).update(created_at=long_ago)

    out = run("purge_jobs")

    assert out.strip() == "deleted 4 finished jobs (succeeded 1, dead 1, cancelled 1, discarded 1) and 1 old events"
    assert set(Job.objects.values_list("id", flat=True)) == {recent.id, old_but_queued.id, old_but_running.id}
    assert not Attempt.objects.filter(job_id__in=purged).exists()
    assert not JobEvent.objects.filter(job_id__in=purged).exists()
    assert not JobEvent.objects.filter(job=None).exists()
    assert JobEvent.objects.filter(job=recent).exists()


def test_purge_honours_older_than_days(make_job):
    job = put_in(make_job("demo.noop"), State.SUCCEEDED, finished_at=timezone.now() - timedelta(days=3))

    assert run("purge_jobs", "--older-than-days", "5").startswith("deleted 0 finished jobs")
    assert Job.objects.filter(id=job.id).exists()
    assert run("purge_jobs", "--older-than-days", "2").startswith("deleted 1 finished jobs")
    assert not Job.objects.filter(id=job.id).exists()


def test_purge_refuses_a_negative_age(make_job):
    job = put_in(make_job("demo.noop"), State.SUCCEEDED, finished_at=timezone.now() - timedelta(days=30))

    with pytest.raises(SystemExit) as caught:
        run("purge_jobs", "--older-than-days", "-1")

    assert caught.value.code == 2
    assert Job.objects.filter(id=job.id).exists()


def test_submit_refuses_an_internal_kind():
    message = refused("jobs", "submit", "webhook.deliver", "--payload", json.dumps({"delivery": str(uuid.uuid4())}))
    assert "kind: 'webhook.deliver' is internal" in message
    assert not Job.objects.exists()
    assert not OrmQ.objects.exists()


# --- the embedded server a one-off command starts ---------------------------


def test_a_command_that_starts_the_embedded_server_says_so_and_make_stop_stops_it():
    import os
    import shutil
    import subprocess
    import sys

    from config import embedded_db
    from tests.conftest import ROOT

    data_dir = ROOT / ".data" / f"cmd-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["CONVEYOR_DATA_DIR"] = str(data_dir)
    pgdata = data_dir / "pg"

    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )

    try:
        started = manage("migrate", "-v", "0")
        assert started.returncode == 0, started.stderr
        lines = started.stderr.strip().splitlines()
        assert len(lines) == 1, started.stderr
        assert "left running" in lines[0] and "make stop" in lines[0], lines[0]
        assert embedded_db.is_running(pgdata)

        # The next command finds it running and leaves it so, saying nothing.
        adopted = manage("jobs", "stats")
        assert adopted.returncode == 0, adopted.stderr
        assert adopted.stderr == ""

        stopped = subprocess.run(["make", "-s", "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not embedded_db.is_running(pgdata)
    finally:
        embedded_db.stop(pgdata)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_schedules_lists_each_schedule_and_run_submits_its_job():
    services.create_schedule(name="nightly", kind="demo.noop", cron="0 3 * * *", timezone="Europe/Berlin")
    services.create_schedule(name="often", kind="demo.noop", interval_seconds=30, enabled=False)
    listing = run("jobs", "schedules").splitlines()
    assert listing[0].startswith("name")
    assert listing[1].split()[:5] == ["nightly", "demo.noop", "0", "3", "*"]
    assert "Europe/Berlin" in listing[1] and "yes" in listing[1]
    assert listing[2].split()[:4] == ["often", "demo.noop", "every", "30s"]
    job_id = run("jobs", "schedules", "--run", "nightly").strip()
    assert Job.objects.get(id=job_id).kind == "demo.noop"
    assert f"{job_id} queued" in run("jobs", "schedules")
    with pytest.raises(CommandError, match="no schedule named 'nope'"):
        run("jobs", "schedules", "--run", "nope")
