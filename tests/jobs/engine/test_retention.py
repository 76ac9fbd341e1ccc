"""Retention (`jobs/engine/retention.py`, `manage.py purge_jobs`): finished history
goes, the dead-letter queue stays longer, and nothing with a webhook message
still to deliver goes at all."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection, models
from django.utils import timezone

from jobs.engine.retention import RELATIONS, purge_finished
from jobs.models import (
    Attempt,
    Batch,
    Job,
    JobDependency,
    JobEvent,
    Page,
    Schedule,
    State,
    WebhookAttempt,
    WebhookDelivery,
)
from jobs.webhooks import messages

pytestmark = pytest.mark.django_db


def aged(job: Job, state: State, days: float) -> Job:
    at = timezone.now() - timedelta(days=days)
    Job.objects.filter(id=job.id).update(state=state, finished_at=at, created_at=at)
    job.refresh_from_db()
    return job


def message_for(job: Job) -> WebhookDelivery:
    """A `job.<state>` message to a callback URL, with its `webhook.deliver` job, as `job_finished` makes it."""
    delivery = WebhookDelivery.objects.create(
        message_id=messages.new_message_id(),
        event_type=f"job.{job.state}",
        body="{}",
        url="https://receiver.example/hook",
        job=job,
    )
    messages.start_delivery(delivery)
    return delivery


def remaining(*jobs: Job) -> set:
    return set(Job.objects.filter(id__in=[job.id for job in jobs]).values_list("id", flat=True))


def test_dead_jobs_have_their_own_longer_retention(make_job):
    succeeded = aged(make_job(), State.SUCCEEDED, 30)
    dead_a_month = aged(make_job(), State.DEAD, 30)
    dead_long_ago = aged(make_job(), State.DEAD, 100)

    deleted = purge_finished(older_than_days=14)

    assert remaining(succeeded, dead_a_month, dead_long_ago) == {dead_a_month.id}
    assert deleted["by_state"] == {"succeeded": 1, "dead": 1}


def test_the_dead_letter_queue_defaults_to_ninety_days(settings):
    assert settings.CONVEYOR["DEAD_RETENTION_DAYS"] == 90


def test_a_job_with_a_webhook_message_still_to_deliver_is_never_purged(make_job):
    pending = aged(make_job(), State.SUCCEEDED, 400)
    message_for(pending)  # its webhook.deliver job is queued
    failing = aged(make_job(), State.DEAD, 400)
    delivery = message_for(failing)
    aged(delivery.deliver_job, State.RETRYING, 0)
    delivered = aged(make_job(), State.SUCCEEDED, 400)
    done = message_for(delivered)
    WebhookDelivery.objects.filter(id=done.id).update(delivered_at=timezone.now())
    aged(done.deliver_job, State.SUCCEEDED, 1)

    purge_finished(older_than_days=14)

    assert remaining(pending, failing, delivered) == {pending.id, failing.id}
    assert WebhookDelivery.objects.filter(job__in=[pending, failing]).count() == 2


def test_a_message_whose_delivery_job_is_in_the_dead_letter_queue_keeps_its_job(make_job):
    # An operator can still retry the delivery job from the dead-letter queue;
    # it needs the message (cascaded away with its job).
    job = aged(make_job(), State.SUCCEEDED, 30)
    delivery = message_for(job)
    aged(delivery.deliver_job, State.DEAD, 30)

    purge_finished(older_than_days=14)

    assert remaining(job, delivery.deliver_job) == {job.id, delivery.deliver_job.id}


def test_a_message_given_up_on_does_not_keep_its_job(make_job):
    job = aged(make_job(), State.SUCCEEDED, 30)
    delivery = message_for(job)
    aged(delivery.deliver_job, State.DISCARDED, 30)

    purge_finished(older_than_days=14)

    assert remaining(job, delivery.deliver_job) == set()


def test_purge_runs_in_chunks(make_job):
    jobs = [aged(make_job(), State.SUCCEEDED, 30) for _ in range(7)]

    deleted = purge_finished(older_than_days=14, chunk=3)

    assert remaining(*jobs) == set()
    assert deleted["jobs"] == 7
    assert deleted["by_state"] == {"succeeded": 7}


def test_purge_jobs_prints_what_it_deleted_by_state(make_job):
    for state, days in ((State.SUCCEEDED, 30), (State.SUCCEEDED, 30), (State.CANCELLED, 30), (State.DEAD, 100)):
        aged(make_job(), state, days)
    aged(make_job(), State.DEAD, 30)  # kept: the dead-letter queue's retention is longer
    out = StringIO()

    call_command("purge_jobs", stdout=out)

    assert out.getvalue().strip() == "deleted 4 finished jobs (succeeded 2, dead 1, cancelled 1) and 0 old events"


def test_purge_jobs_takes_the_dead_letter_queues_age(make_job):
    dead = aged(make_job(), State.DEAD, 30)
    out = StringIO()

    call_command("purge_jobs", "--dead-older-than-days", "20", stdout=out)

    assert remaining(dead) == set()
    assert "(dead 1)" in out.getvalue()


def test_every_reference_to_a_job_or_an_attempt_is_handled_as_its_model_says():
    # The purge deletes with SQL, not Django's collector: a foreign key added to
    # a model must join RELATIONS (and the purge's statements) with it.
    found = {}
    for model in (Job, Attempt):
        for relation in model._meta.get_fields(include_hidden=True):
            if not relation.auto_created or relation.concrete:
                continue
            key = (relation.related_model._meta.db_table, relation.field.column)
            found[key] = {models.CASCADE: "cascade", models.SET_NULL: "set null"}.get(relation.on_delete, "?")
    assert found == RELATIONS


def _attempt(job: Job) -> Attempt:
    at = timezone.now() - timedelta(days=30)
    return Attempt.objects.create(job=job, number=1, started_at=at, finished_at=at, outcome="succeeded")


def _delivered(job: Job) -> tuple[WebhookDelivery, Job, WebhookAttempt]:
    """A message about `job`, delivered by a `webhook.deliver` job finished a
    month ago: (the message, its delivery job, its one HTTP attempt)."""
    delivery = message_for(job)
    deliver_job = aged(delivery.deliver_job, State.SUCCEEDED, 30)
    WebhookDelivery.objects.filter(id=delivery.id).update(delivered_at=timezone.now())
    attempt = WebhookAttempt.objects.create(
        delivery=delivery, deliver_job=deliver_job, job_attempt=_attempt(deliver_job), number=1,
        started_at=timezone.now(), status_code=200,
    )  # fmt: skip
    return delivery, deliver_job, attempt


def test_purge_deletes_what_hangs_on_a_job_and_unlinks_what_only_points_at_it(make_job):
    old = aged(make_job(), State.SUCCEEDED, 30)
    _attempt(old)
    delivered, deliver_job, _ = _delivered(old)
    fresh = make_job()  # its message's delivery job is old and purged: the message stays, unlinked
    kept_message, kept_deliver_job, kept_attempt = _delivered(fresh)
    JobDependency.objects.create(job=fresh, depends_on=old, resolved=True, outcome="succeeded")
    batch = Batch.objects.create(name="b", then_job=old)
    page = Page.objects.create(job=old, slug="p", title="P", body_markdown="x")

    deleted = purge_finished(older_than_days=14)

    assert deleted["by_state"] == {"succeeded": 3}
    assert remaining(old, deliver_job, kept_deliver_job, fresh) == {fresh.id}
    assert not Attempt.objects.filter(job__in=[old, deliver_job, kept_deliver_job]).exists()
    assert not JobEvent.objects.filter(job__in=[old, deliver_job, kept_deliver_job]).exists()
    assert not WebhookDelivery.objects.filter(id=delivered.id).exists()
    assert not JobDependency.objects.exists()
    kept_message.refresh_from_db()
    kept_attempt.refresh_from_db()
    batch.refresh_from_db()
    page.refresh_from_db()
    assert kept_message.deliver_job_id is None
    assert (kept_attempt.deliver_job_id, kept_attempt.job_attempt_id) == (None, None)
    assert (batch.then_job_id, page.job_id) == (None, None)
    assert WebhookAttempt.objects.count() == 1


def test_purge_goes_oldest_first_and_leaves_younger_jobs(make_job):
    jobs = [aged(make_job(), State.SUCCEEDED, days) for days in (40, 30, 20, 10)]

    deleted = purge_finished(older_than_days=15, chunk=1)

    assert deleted["jobs"] == 3
    assert remaining(*jobs) == {jobs[-1].id}


# --- references without database constraints (migration 0021) -------------------------


def _referenced_table(table: str, column: str) -> str:
    return "jobs_attempt" if (table, column) == ("jobs_webhookattempt", "job_attempt_id") else "jobs_job"


def _dangling() -> dict[tuple[str, str], int]:
    """For every reference in RELATIONS: how many rows point at a job (or attempt) that is gone."""
    counts = {}
    with connection.cursor() as cursor:
        for table, column in RELATIONS:
            target = _referenced_table(table, column)
            cursor.execute(
                f"SELECT count(*) FROM {table} t WHERE t.{column} IS NOT NULL"
                f" AND NOT EXISTS (SELECT 1 FROM {target} r WHERE r.id = t.{column})"
            )
            counts[(table, column)] = cursor.fetchone()[0]
    return counts


def _pointing_at(jobs: list[Job]) -> dict[tuple[str, str], int]:
    """For every reference in RELATIONS: how many rows point at one of `jobs` (or one of their attempts)."""
    ids = [str(job.id) for job in jobs]
    counts = {}
    with connection.cursor() as cursor:
        for table, column in RELATIONS:
            if _referenced_table(table, column) == "jobs_attempt":
                where = f"{column} IN (SELECT id FROM jobs_attempt WHERE job_id = ANY(%s::uuid[]))"
            else:
                where = f"{column} = ANY(%s::uuid[])"
            cursor.execute(f"SELECT count(*) FROM {table} WHERE {where}", [ids])
            counts[(table, column)] = cursor.fetchone()[0]
    return counts


def _referenced_from_everywhere(make_job) -> tuple[list[Job], dict]:
    """Old finished jobs that a row of every relation in RELATIONS points at,
    and the rows that outlive them (unlinked); returns (old jobs, kept rows)."""
    old = aged(make_job(), State.SUCCEEDED, 30)
    follower = aged(make_job(), State.SUCCEEDED, 30)
    _attempt(old)
    JobDependency.objects.create(job=follower, depends_on=old, resolved=True, outcome="succeeded")
    _, deliver_job, _ = _delivered(old)
    fresh = make_job()  # its message stays, unlinked from its purged delivery job
    kept_message, kept_deliver_job, kept_attempt = _delivered(fresh)
    kept = {
        "message": kept_message,
        "attempt": kept_attempt,
        "batch": Batch.objects.create(name="b", then_job=old),
        "page": Page.objects.create(job=old, slug="p", title="P", body_markdown="x"),
        "schedule": Schedule.objects.create(name="s", kind="demo.noop", interval_seconds=60, last_job=old),
    }
    return [old, follower, deliver_job, kept_deliver_job], kept


def _assert_unlinked(kept: dict) -> None:
    for row in kept.values():
        row.refresh_from_db()
    assert kept["message"].deliver_job_id is None
    assert (kept["attempt"].deliver_job_id, kept["attempt"].job_attempt_id) == (None, None)
    assert (kept["batch"].then_job_id, kept["page"].job_id, kept["schedule"].last_job_id) == (None, None, None)


def test_the_database_holds_no_foreign_key_to_a_job_or_an_attempt_and_indexes_every_reference():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint"
            " WHERE contype = 'f' AND confrelid IN ('jobs_job'::regclass, 'jobs_attempt'::regclass)"
        )
        assert cursor.fetchall() == []
        # Each referencing column leads an index: the purge (and Django's cascade) find the rows by it.
        cursor.execute(
            "SELECT i.indrelid::regclass::text, a.attname FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        )
        leading = set(cursor.fetchall())
    assert set(RELATIONS) <= leading


def test_a_purge_leaves_no_reference_to_a_deleted_job_in_any_relation(make_job):
    purged, kept = _referenced_from_everywhere(make_job)
    before = _pointing_at(purged)
    assert all(before.values()), before  # every relation is exercised

    report = purge_finished(older_than_days=14)

    assert report == {"jobs": 4, "events": 0, "by_state": {"succeeded": 4}}
    assert remaining(*purged) == set()
    assert _dangling() == dict.fromkeys(RELATIONS, 0)
    _assert_unlinked(kept)
    assert WebhookDelivery.objects.count() == 1  # the fresh job's message, its delivery job gone
    assert JobDependency.objects.count() == 0


def test_deleting_jobs_with_the_orm_still_cascades_and_unlinks(make_job):
    purged, kept = _referenced_from_everywhere(make_job)

    Job.objects.filter(id__in=[job.id for job in purged]).delete()

    assert remaining(*purged) == set()
    assert _pointing_at(purged) == dict.fromkeys(RELATIONS, 0)
    assert _dangling() == dict.fromkeys(RELATIONS, 0)
    _assert_unlinked(kept)


def test_deleting_a_job_in_the_admin_still_cascades_and_unlinks(make_job, client):
    # (The admin refuses a job with webhook messages: their history is not the admin's to delete.)
    job = aged(make_job(), State.SUCCEEDED, 30)
    _attempt(job)
    follower = make_job(depends_on=[job.id])
    batch = Batch.objects.create(name="b", then_job=job)
    page = Page.objects.create(job=job, slug="p", title="P", body_markdown="x")
    schedule = Schedule.objects.create(name="s", kind="demo.noop", interval_seconds=60, last_job=job)
    before = _pointing_at([job])
    client.force_login(User.objects.create_superuser("ada", password="pw"))

    response = client.post(f"/admin/jobs/job/{job.id}/delete/", {"post": "yes"})

    assert response.status_code == 302, response.content[:500]
    assert remaining(job, follower) == {follower.id}
    assert {key: n for key, n in before.items() if n} == {
        ("jobs_jobevent", "job_id"): 1,
        ("jobs_attempt", "job_id"): 1,
        ("jobs_jobdependency", "depends_on_id"): 1,
        ("jobs_batch", "then_job_id"): 1,
        ("jobs_page", "job_id"): 1,
        ("jobs_schedule", "last_job_id"): 1,
    }
    assert _pointing_at([job]) == dict.fromkeys(RELATIONS, 0)
    assert _dangling() == dict.fromkeys(RELATIONS, 0)
    for row in (batch, page, schedule):
        row.refresh_from_db()
    assert (batch.then_job_id, page.job_id, schedule.last_job_id) == (None, None, None)


def _foreign_keys_and_indexes() -> tuple[int, set[str]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_constraint"
            " WHERE contype = 'f' AND confrelid IN ('jobs_job'::regclass, 'jobs_attempt'::regclass)"
        )
        (keys,) = cursor.fetchone()
        cursor.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        return keys, {name for (name,) in cursor.fetchall()}


@pytest.mark.django_db(transaction=True)
def test_the_migration_drops_the_constraints_keeps_the_indexes_and_goes_back():
    from django.db.migrations.executor import MigrationExecutor

    def migrate(target: str) -> None:
        MigrationExecutor(connection).migrate([("jobs", target)])

    keys_after, indexes_after = _foreign_keys_and_indexes()
    migrate("0020_history_indexes")
    try:
        keys_before, indexes_before = _foreign_keys_and_indexes()
        assert (keys_before, keys_after) == (len(RELATIONS), 0)
        assert indexes_before == indexes_after
        migrate("0021_history_fk_without_constraints")
        assert _foreign_keys_and_indexes() == (0, indexes_after)
    finally:  # back to the latest, whatever later migrations there are
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes("jobs")[0][1])


def test_a_chunk_finds_its_rows_by_index_not_by_reading_the_whole_history():
    # Found by bench/history.py at 500,000 jobs: with a chunk of 20,000 the
    # planner hashed the chunk and read the whole of jobs, attempts and events
    # once per chunk (1.6 s a chunk, growing with the history) instead of
    # probing their indexes (0.7 s).
    from jobs.engine import retention

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs_job (id, kind, queue, payload, state, priority, attempts, max_attempts, backoff_base,"
            " backoff_max, timeout, lease_owner, progress_percent, progress_message, prompt_tokens,"
            " completion_tokens, error_type, error_message, error_traceback, owner, request_fingerprint,"
            " callback_url, has_dependents, pending_dependencies, on_dependency_failure, created_at, updated_at,"
            " finished_at)"
            " SELECT md5('chunk' || g)::uuid, 'demo.noop', 'default', '{}', 'succeeded', 0, 1, 3, 2, 600, 600, '',"
            " 100, '', 0, 0, '', '', '', '', '', '', false, 0, 'cancel', now(), now(), now()"
            " FROM generate_series(1, 10000) g"
        )
        cursor.execute(
            "INSERT INTO jobs_attempt (job_id, number, worker, started_at, outcome, error_type, error_message,"
            " traceback, output, logs) SELECT id, 1, '', now(), 'succeeded', '', '', '', '', '' FROM jobs_job"
        )
        cursor.execute(
            "INSERT INTO jobs_jobevent (job_id, type, data, created_at)"
            " SELECT id, 'job.created', '{}', now() FROM jobs_job, generate_series(1, 3)"
        )
        cursor.execute("ANALYZE jobs_job, jobs_attempt, jobs_jobevent")
        cursor.execute(retention._CHUNK_TABLE)
        plans = []
        # Chunks from a 25th of the history (20,000 of 500,000 in the bench) to
        # a half. From about a tenth a sequential scan with a memoized probe of
        # the chunk costs about the same as the probes, and which one the
        # planner took changed from run to run (the purge does not analyze the
        # chunk: the planner sizes it by its pages, 900 rows for these 400 in
        # one CI run). Sequential scans are off for the chunk: it probes.
        for rows in (400, 1000, 2500, 5000):
            cursor.execute("SAVEPOINT chunk")
            cursor.execute(
                "INSERT INTO conveyor_purge SELECT id, state, finished_at, ctid FROM jobs_job LIMIT %s", [rows]
            )
            for setting in retention._CHUNK_SETTINGS:
                cursor.execute(setting)
            for statement in (*retention._BEFORE, retention._DELETE):
                cursor.execute("EXPLAIN " + statement)
                plans.append(f"-- {rows} jobs\n" + "\n".join(line for (line,) in cursor.fetchall()))
            cursor.execute("ROLLBACK TO SAVEPOINT chunk")

    history = ("Seq Scan on jobs_job ", "Seq Scan on jobs_attempt ", "Seq Scan on jobs_jobevent ")
    scans = [line.strip() for plan in plans for line in plan.splitlines() if line.strip("-> ").startswith(history)]
    assert scans == [], "\n\n".join(plans)
    # The jobs themselves are deleted where the chunk found them (their row
    # addresses, held since: the chunk locked them), not looked up again in
    # the primary key: 143 of a chunk's 587 ms at 2,000,000 jobs went there.
    deletes = [plan for plan in plans if "Delete on jobs_job j" in plan]
    assert len(deletes) == 4
    for plan in deletes:
        assert "Tid Scan on jobs_job" in plan, plan
        assert "jobs_job_pkey" not in plan, plan
        # Events and attempts are found with the chunk's ids as one array: one
        # index scan each, not one probe per job from a nested loop (15-20 %
        # of the purge at 2,000,000 jobs; bench/README.md, "The purge's ids as
        # one array").
        conditions = [line.strip() for line in plan.splitlines() if "Index Cond: (job_id" in line]
        assert len(conditions) == 2, plan
        assert all(re.fullmatch(r"Index Cond: \(job_id = ANY \(\(InitPlan \d+\)\.col1\)\)", c) for c in conditions), (
            plan
        )


def test_a_job_not_found_at_its_row_address_is_still_deleted_by_id(make_job, monkeypatch):
    # The chunk deletes its jobs at the row addresses it locked; should one not
    # be there, the purge falls back to its id rather than leave a job whose
    # events and attempts it has just deleted.
    from jobs.engine import retention

    old = [aged(make_job(), State.SUCCEEDED, 30) for _ in range(3)]
    young = aged(make_job(), State.SUCCEEDED, 1)
    for job in old:
        _attempt(job)
    monkeypatch.setattr(retention, "_DUE", retention._DUE.replace("j.ctid AS tid", "'(0,0)'::tid AS tid"))

    deleted = purge_finished(older_than_days=15)

    assert deleted["jobs"] == 3
    assert remaining(*old, young) == {young.id}
    assert not JobEvent.objects.filter(job_id__in=[job.id for job in old]).exists()
    assert not Attempt.objects.filter(job_id__in=[job.id for job in old]).exists()
