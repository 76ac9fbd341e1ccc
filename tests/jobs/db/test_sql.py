"""jobs/db/sql.py: the job path's statements run as server-side prepared statements."""

from __future__ import annotations

import re

import psycopg
import pytest
from django.db import connection

from jobs.db import sql
from jobs.models import Job, State
from jobs.worker import runner

pytestmark = pytest.mark.django_db(transaction=True)


def prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def test_a_job_s_claim_and_finish_are_prepared_on_the_worker_connection(make_job):
    job = make_job("demo.noop")
    with sql.cursor() as cursor:
        assert not isinstance(cursor.cursor, psycopg.ClientCursor)  # parameters bound server-side

    runner.run_job(str(job.id))

    assert Job.objects.get(id=job.id).state == State.SUCCEEDED
    texts = prepared_statements()
    # The claim's queue gate (jobs/engine/queues.py) comes first, so its state is not always $1.
    assert any(re.search(r"UPDATE jobs_job SET state = \$\d+", t) and "'queued'" in t for t in texts), texts
    assert any(re.search(r"UPDATE jobs_job SET state = \$\d+", t) and "('running')" in t for t in texts), texts


def test_the_rows_come_back_as_the_orm_builds_them(make_job):
    job = make_job("demo.async_sleep", {"seconds": 0.5})

    with sql.cursor() as cursor:
        cursor.execute(f"SELECT {sql.job_columns()[0]} FROM jobs_job WHERE id = %s", [str(job.id)])
        built = sql.job_from_row(cursor.fetchone())

    loaded = Job.objects.get(id=job.id)
    for field in Job._meta.concrete_fields:
        assert getattr(built, field.attname) == getattr(loaded, field.attname), field.name
    assert built._state.adding is False and built._state.db == "default"


def test_switched_off_the_statements_go_through_django_s_cursor(make_job, settings):
    settings.CONVEYOR = {**settings.CONVEYOR, "PREPARED_STATEMENTS": False}
    job = make_job("demo.noop")

    with sql.cursor() as cursor:
        assert isinstance(cursor.cursor, psycopg.ClientCursor)  # parameters merged into the text
    runner.run_job(str(job.id))

    assert Job.objects.get(id=job.id).state == State.SUCCEEDED


def test_a_failing_statement_raises_django_s_error_and_leaves_the_connection_usable():
    from django.db import IntegrityError

    # A NOT NULL column left empty (events carry no foreign-key constraint since migration 0021).
    with pytest.raises(IntegrityError), sql.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs_jobevent (job_id, type, data, created_at) VALUES (%s, NULL, '{}', now())",
            ["00000000-0000-0000-0000-000000000000"],
        )
    assert sql.fetchone("SELECT %s::int + 1", [1]) == (2,)


def test_prepared_statements_are_logged_like_django_s(make_job):
    from django.test.utils import CaptureQueriesContext

    job = make_job("demo.noop")
    with CaptureQueriesContext(connection) as queries:
        runner.run_job(str(job.id))

    texts = [query["sql"] for query in queries.captured_queries]
    assert all(texts), texts
    assert sum("UPDATE jobs_job SET state = %s" in text for text in texts) == 2, texts
