"""The lane's statements that find jobs by id keep their plan when the
statistics are from before a burst: a table of finished jobs analyzed, then
hundreds of them running (autovacuum would analyze again a minute or more
later). With such statistics Postgres took the state index for "the one
running job" and walked every running job in each statement."""

from __future__ import annotations

import pytest
from django.db import connection

from jobs.db import sql
from jobs.djangoq import broker
from jobs.engine import states
from jobs.engine.states import LaneSuccess, succeed_many
from jobs.worker.heartbeat import Progress, record_progress, renew_leases

pytestmark = pytest.mark.django_db(transaction=True)

WORKER = "burst:1"


@pytest.fixture
def burst(make_job):
    """600 finished jobs analyzed, then 400 of them running under WORKER."""
    yield from _after_analyze(make_job, "running")


@pytest.fixture
def backlog(make_job):
    """600 finished jobs analyzed, then 400 of them queued, with broker rows."""
    yield from _after_analyze(make_job, "queued")


def _after_analyze(make_job, state: str):
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
            cursor.execute("DELETE FROM django_q_ormq")
            cursor.execute(
                "UPDATE jobs_job SET state = %s, lease_owner = %s, attempts = 1, finished_at = NULL,"
                " lease_expires_at = now() + interval '1 hour' WHERE id IN"
                " (SELECT id FROM jobs_job WHERE state = 'succeeded' ORDER BY id LIMIT 400) RETURNING id",
                [state, WORKER if state == "running" else ""],
            )
            ids = [row[0] for row in cursor.fetchall()]
            cursor.execute(
                "INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
                " SELECT %s, 'x', now(), 0, id FROM jobs_job WHERE id = ANY(%s::uuid[])",
                [broker.cluster_for_queue(template.queue), ids],
            )
            yield ids
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


def test_a_claim_joins_its_broker_rows_to_their_jobs_by_id_with_stale_statistics(backlog, make_job):
    """(On a table this small Postgres already chose the primary key here; in
    the 10,000-page run, with the broker table's statistics stale too, the
    claim's join went through the state index: this keeps it off it.)"""
    key = broker.cluster_for_queue(make_job("demo.noop").queue)

    def claim():
        rows, _ = states.claim_ready(
            key, WORKER, 8, ["demo.noop"], lease_seconds=30, rearm=sql.Sql("now() + interval '1 minute'")
        )
        assert len(rows) == 8

    for plan in _plans(claim):
        assert _indexes(plan) <= {"jobs_job_pkey"}
