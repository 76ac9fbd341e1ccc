"""The lane's statements that find jobs by id keep their plan when the
statistics are from before a burst: a table of finished jobs analyzed, then
hundreds of them running (autovacuum would analyze again a minute or more
later). With such statistics Postgres took the state index for "the one
running job" and walked every running job in each statement."""

from __future__ import annotations

import pytest
from django.db import connection

from jobs.db import sql
from jobs.engine.states import LaneSuccess, succeed_many
from jobs.worker.heartbeat import Progress, record_progress, renew_leases

pytestmark = pytest.mark.django_db(transaction=True)

WORKER = "burst:1"


@pytest.fixture
def burst(make_job):
    """600 finished jobs analyzed, then 400 of them running under WORKER."""
    template = make_job("demo.noop")
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE jobs_job SET (autovacuum_enabled = false)")
        try:
            cursor.execute(
                "INSERT INTO jobs_job SELECT r.* FROM jobs_job j, generate_series(1, 600) AS g,"
                " jsonb_populate_record(NULL::jobs_job, to_jsonb(j) || jsonb_build_object("
                "'id', md5(j.id::text || g)::uuid, 'state', 'succeeded', 'finished_at', now())) AS r WHERE j.id = %s",
                [template.id],
            )
            cursor.execute("ANALYZE jobs_job")
            cursor.execute(
                "UPDATE jobs_job SET state = 'running', lease_owner = %s, attempts = 1, finished_at = NULL,"
                " lease_expires_at = now() + interval '1 hour' WHERE id IN"
                " (SELECT id FROM jobs_job WHERE state = 'succeeded' ORDER BY id LIMIT 400) RETURNING id",
                [WORKER],
            )
            running = [row[0] for row in cursor.fetchall()]
            yield running
        finally:
            cursor.execute("ALTER TABLE jobs_job RESET (autovacuum_enabled)")


def _indexes(plan) -> set[str]:
    """The indexes of jobs_job an EXPLAIN (FORMAT JSON) plan uses."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'jobs_job'")
        of_jobs = {row[0] for row in cursor.fetchall()}
    used = set()
    nodes = list(plan)
    while nodes:
        node = nodes.pop()
        node = node.get("Plan", node)
        used.add(node.get("Index Name"))
        nodes.extend(node.get("Plans", ()))
    return used & of_jobs


def _plans(run) -> list:
    """EXPLAIN (not run) of each statement on jobs_job that `run` executes."""
    captured = []

    def capture(execute, statement, params, many, context):
        captured.append((statement, params))
        return execute(statement, params, many, context)

    with connection.execute_wrapper(capture):
        run()
    plans = []
    for statement, params in captured:
        if "jobs_job" not in statement:
            continue
        with sql.cursor() as cursor:  # bound as the statement was
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, params)
            plans.append(cursor.fetchone()[0])
    assert plans, "no statement on jobs_job was captured"
    return plans


def test_the_batched_success_looks_jobs_up_by_id_with_stale_statistics(burst):
    done = [LaneSuccess(job_id, WORKER, {"ok": True}) for job_id in burst[:3]]
    for plan in _plans(lambda: succeed_many(done)):
        assert _indexes(plan) <= {"jobs_job_pkey"}


def test_progress_and_lease_renewals_look_jobs_up_by_id_with_stale_statistics(burst):
    reports = {job_id: Progress(50, "half", WORKER, "text", attempt=1, delta="text") for job_id in burst[:3]}
    for plan in _plans(lambda: record_progress(reports)):
        assert _indexes(plan) <= {"jobs_job_pkey"}
    for plan in _plans(lambda: renew_leases(dict.fromkeys(burst[:3], WORKER), 30)):
        assert _indexes(plan) <= {"jobs_job_pkey"}
