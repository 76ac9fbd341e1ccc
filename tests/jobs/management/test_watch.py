"""`jobs watch` in-process: what it makes of the events it reads back."""

from __future__ import annotations

import io

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from jobs.djangoq.broker import listen_params
from jobs.management.watch import Watch
from jobs.models import Job
from jobs.services import submit_batch
from jobs.worker import claims
from jobs.worker.heartbeat import Progress, record_progress

pytestmark = pytest.mark.django_db(transaction=True)


def connect() -> psycopg.Connection:
    return psycopg.connect(make_conninfo(**listen_params("test-watch")), autocommit=True)


def test_a_re_read_below_the_cursor_does_not_take_old_events_for_news(make_job):
    batch = submit_batch("two", [{"kind": "demo.noop", "payload": {}}] * 2).batch
    first = Job.objects.filter(batch=batch).first()
    out = io.StringIO()
    watch = Watch(out, tty=False, batch=batch)
    with connect() as conn:
        watch._start(conn)
        assert claims.claim(str(first.id), "w")
        watch._read(conn)  # its job.started
        watch._read(conn, margin=True)  # what a wake-up without notification does: job.created again?

    assert sorted(shown.state for shown in watch.jobs.values()) == ["queued", "running"]
    assert out.getvalue().splitlines()[-1].endswith("0/2 finished: 1 queued, 1 running")


def test_a_job_s_text_so_far_is_shown_once_then_only_what_follows(make_job):
    job = make_job("demo.noop")
    assert claims.claim(str(job.id), "w")
    record_progress({job.id: Progress(10, "m", "w", "line one\nline", attempt=1, delta="line one\nline")})
    out = io.StringIO()
    watch = Watch(out, tty=False, job=job)
    with connect() as conn:
        watch._start(conn)
        text = "line one\nline two\n"
        record_progress({job.id: Progress(20, "m", "w", text, attempt=1, offset=13, delta=" two\n")})
        watch._read(conn)
        watch._read(conn, margin=True)

    assert [line for line in out.getvalue().splitlines() if line.startswith("line")] == ["line one", "line two"]
