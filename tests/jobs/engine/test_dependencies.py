"""Workflows: `depends_on`, the `waiting` state, fan-in and a batch's `then` job
(jobs/engine/dependencies.py), on a real Postgres; the end-to-end ones with
real qcluster processes."""

from __future__ import annotations

import re
import threading
import uuid

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from jobs.engine import deadletter
from jobs.engine.batches import submit_batch
from jobs.engine.states import QuietSuccess, Sql, transition
from jobs.engine.submission import submit_job
from jobs.errors import IdempotencyKeyReused, InvalidJob
from jobs.models import Batch, Job, JobDependency, JobEvent, State
from jobs.webhooks.messages import subscribed_event_types
from jobs.worker import claims
from tests.conftest import wait_until

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def run(job_id, *, result=None, state=State.SUCCEEDED):
    """Finish `job_id` as a worker would: claim it, then succeed (or die) through the state machine."""
    assert transition(job_id, target=State.RUNNING, attempts=1, lease_owner="test-worker") is not None
    fields = {"result": result} if state == State.SUCCEEDED else {"error_type": "Boom", "error_message": "boom"}
    finished = transition(
        job_id, target=state, where=Sql("lease_owner = %s", "test-worker"), finished_at=Sql("now()"), **fields
    )
    assert finished is not None
    return finished


def state_of(job) -> str:
    return Job.objects.get(id=job.id).state


def _broker_rows(job) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_q_ormq WHERE job_id = %s", [str(job.id)])
        return cursor.fetchone()[0]


# --- submission ------------------------------------------------------------------


def test_a_job_with_pending_dependencies_is_created_waiting_without_a_broker_row(db, make_job):
    a = make_job()
    b = make_job(depends_on=[a.id])

    assert (b.state, b.pending_dependencies) == ("waiting", 1)
    assert _broker_rows(b) == 0
    assert Job.objects.get(id=a.id).has_dependents
    assert list(JobDependency.objects.values_list("job_id", "depends_on_id", "resolved")) == [(b.id, a.id, False)]
    assert JobEvent.objects.get(job=b, type="job.created").data == {"state": "waiting", "kind": "demo.noop"}


def test_a_job_whose_dependencies_already_succeeded_is_queued_at_once(db, make_job):
    a = make_job()
    run(a.id, result={"n": 1})

    b = make_job(depends_on=[str(a.id)])

    assert (b.state, b.pending_dependencies) == ("queued", 0)
    assert _broker_rows(b) == 1


def test_a_job_whose_dependency_is_already_dead_is_cancelled_at_once_naming_it(db, make_job):
    a = make_job("demo.fail", {"mode": "permanent"})
    run(a.id, state=State.DEAD)

    b = make_job(depends_on=[a.id])

    assert b.state == "cancelled"
    assert b.error_type == "DependencyFailed"
    assert b.error_message == f"dependency {a.id} ended dead"
    assert _broker_rows(b) == 0


@pytest.mark.parametrize(
    ("depends_on", "errors"),
    [
        (["nope"], [("depends_on[0]", "is not a job id")]),
        ("abc", [("depends_on", "must be a list of job ids")]),
    ],
)
def test_malformed_dependencies_are_refused_with_field_errors(db, make_job, depends_on, errors):
    with pytest.raises(InvalidJob) as refused:
        make_job(depends_on=depends_on)
    assert [(e["field"], e["message"]) for e in refused.value.errors] == errors
    assert not Job.objects.exists()


def test_unknown_and_duplicate_ids_are_refused_naming_their_index_and_nothing_is_written(db, make_job):
    a = make_job()
    never = uuid.uuid4()

    with pytest.raises(InvalidJob) as unknown:
        make_job(depends_on=[a.id, never])
    with pytest.raises(InvalidJob) as twice:
        make_job(depends_on=[a.id, str(a.id)])

    assert unknown.value.errors == [{"field": "depends_on[1]", "message": f"no job with id {never}"}]
    assert twice.value.errors == [{"field": "depends_on[1]", "message": "lists the same job twice"}]
    assert list(Job.objects.values_list("id", flat=True)) == [a.id]
    assert not JobDependency.objects.exists()


def test_another_owners_job_is_unknown_to_a_tenant(db, make_job):
    theirs = make_job(owner="apikey:1")

    with pytest.raises(InvalidJob) as refused:
        make_job(owner="apikey:2", depends_on=[theirs.id], visible_to="apikey:2")

    assert refused.value.errors == [{"field": "depends_on[0]", "message": f"no job with id {theirs.id}"}]
    assert make_job(owner="apikey:1", depends_on=[theirs.id], visible_to="apikey:1").state == "waiting"


def test_an_unknown_policy_is_refused(db, make_job):
    with pytest.raises(InvalidJob) as refused:
        make_job(on_dependency_failure="ignore")
    assert refused.value.errors == [{"field": "on_dependency_failure", "message": 'must be "cancel" or "run"'}]


def test_an_idempotency_key_replays_the_same_workflow_and_refuses_another(db, make_job):
    a, other = make_job(), make_job()
    first = submit_job("demo.noop", {}, depends_on=[a.id], idempotency_key="k1")

    again = submit_job("demo.noop", {}, depends_on=[a.id], idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused):
        submit_job("demo.noop", {}, depends_on=[other.id], idempotency_key="k1")

    assert (again.created, again.job.id) == (False, first.job.id)
    assert JobDependency.objects.count() == 1


# --- finishing dependencies ------------------------------------------------------


def test_the_last_dependency_to_finish_queues_the_dependent_in_its_transition(db, make_job):
    a, b = make_job(), make_job()
    c = make_job(depends_on=[a.id, b.id])

    run(a.id)
    assert (state_of(c), Job.objects.get(id=c.id).pending_dependencies) == ("waiting", 1)
    run(b.id)

    assert state_of(c) == "queued"
    assert _broker_rows(c) == 1
    assert JobEvent.objects.get(job=c, type="job.queued").data["reason"] == "dependencies finished"


def test_a_failed_dependency_cancels_the_dependent_and_its_dependents_naming_it(db, make_job):
    a = make_job("demo.fail", {"mode": "permanent"})
    b = make_job(depends_on=[a.id])
    c = make_job(depends_on=[b.id])

    run(a.id, state=State.DEAD)

    b.refresh_from_db()
    c.refresh_from_db()
    assert (b.state, b.error_message) == ("cancelled", f"dependency {a.id} ended dead")
    assert (c.state, c.error_message) == ("cancelled", f"dependency {b.id} ended cancelled")
    event = JobEvent.objects.get(job=b, type="job.cancelled")
    assert event.data["dependency"] == str(a.id)


@pytest.mark.parametrize("how", ["cancelled", "discarded"])
def test_a_cancelled_or_discarded_dependency_cancels_too(db, make_job, how):
    a = make_job("demo.fail", {"mode": "permanent"})
    b = make_job(depends_on=[a.id])
    if how == "cancelled":
        deadletter.cancel_job(a.id)
    else:
        c = make_job(depends_on=[a.id], on_dependency_failure="run")
        run(a.id, state=State.DEAD)
        deadletter.discard_job(a.id)
        # dead resolved the edge once; discarding it does not count it again
        assert Job.objects.get(id=c.id).pending_dependencies == 0

    assert (
        Job.objects.get(id=b.id).error_message
        == f"dependency {a.id} ended {'cancelled' if how == 'cancelled' else 'dead'}"
    )


def test_the_run_policy_runs_the_dependent_anyway(db, make_job):
    a = make_job("demo.fail", {"mode": "permanent"})
    ok = make_job()
    b = make_job(depends_on=[a.id, ok.id], on_dependency_failure="run")

    run(a.id, state=State.DEAD)
    assert state_of(b) == "waiting"
    run(ok.id)

    assert state_of(b) == "queued"


def test_retrying_a_dead_dependency_re_arms_what_it_cancelled_and_success_then_queues_it(db, make_job):
    a = make_job("demo.fail", {"mode": "permanent"})
    b = make_job(depends_on=[a.id])
    c = make_job(depends_on=[b.id])
    run(a.id, state=State.DEAD)
    assert state_of(c) == "cancelled"

    deadletter.retry_job(a.id)

    b.refresh_from_db()
    assert (b.state, b.pending_dependencies, b.error_message, b.finished_at) == ("waiting", 1, "", None)
    assert state_of(c) == "waiting"
    assert JobEvent.objects.get(job=b, type="job.waiting").data["reason"] == "dependency retried"
    run(a.id)
    assert state_of(b) == "queued"
    assert state_of(c) == "waiting"


def test_an_operator_can_cancel_a_waiting_job(db, make_job):
    a = make_job()
    b = make_job(depends_on=[a.id])

    deadletter.cancel_job(b.id)
    run(a.id)

    assert state_of(b) == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_a_job_without_dependents_still_finishes_in_one_statement(make_job, django_assert_num_queries):
    job = make_job()
    transition(job.id, target=State.RUNNING, attempts=1, lease_owner="w")
    subscribed_event_types()  # the webhooks' per-process cache, read once a second

    with django_assert_num_queries(1):
        assert transition(job.id, target=State.SUCCEEDED, finished_at=Sql("now()")).state == "succeeded"


# --- the race with submission -----------------------------------------------------


def _blocked_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        # Inside a transaction the statistics views are a snapshot: take a fresh one.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def _activity() -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, state, wait_event_type, wait_event, left(query, 80) FROM pg_stat_activity"
            " WHERE datname = current_database()"
        )
        return f"a lock wait; the sessions: {cursor.fetchall()}"


def _in_thread(target) -> threading.Thread:
    def body():
        try:
            target()
        except BaseException as exc:
            thread.error = exc
            raise
        finally:
            connections.close_all()

    thread = threading.Thread(target=body)
    thread.error = None
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_dependency_finishing_during_the_submission_still_queues_the_dependent(make_job):
    """The submission has locked the dependency and not committed; the worker's
    one-statement finish waits for it, then finds `has_dependents` and resolves."""
    a = make_job()
    transition(a.id, target=State.RUNNING, attempts=1, lease_owner="w")
    with transaction.atomic():
        b = make_job(depends_on=[a.id])
        finishing = _in_thread(lambda: transition(a.id, target=State.SUCCEEDED, finished_at=Sql("now()")))
        wait_until(lambda: _blocked_on_a_lock() or finishing.error, timeout=10, message=_activity)
        assert finishing.error is None
    finishing.join(10)

    assert state_of(a) == "succeeded"
    assert state_of(b) == "queued"
    assert _broker_rows(b) == 1


@pytest.mark.django_db(transaction=True)
def test_a_submission_during_a_dependency_s_finish_sees_it_finished(make_job):
    """The finish holds the row; the submission waits for its commit and sees it succeeded."""
    a = make_job()
    transition(a.id, target=State.RUNNING, attempts=1, lease_owner="w")
    submitted = {}
    with transaction.atomic():
        transition(a.id, target=State.SUCCEEDED, finished_at=Sql("now()"))
        submitting = _in_thread(lambda: submitted.update(job=make_job(depends_on=[a.id])))
        wait_until(
            lambda: _blocked_on_a_lock() or submitting.error,
            timeout=10,
            message=_activity,
        )
        assert submitting.error is None
    submitting.join(10)

    assert submitted["job"].state == "queued"
    assert _broker_rows(submitted["job"]) == 1


# --- a batch's then job ----------------------------------------------------------


def test_a_batch_then_job_waits_for_every_job_and_is_queued_by_the_last(db):
    batch = submit_batch(
        "b", [{"kind": "demo.noop", "payload": {}}] * 3, then={"kind": "demo.collect", "payload": {}}
    ).batch
    then = Batch.objects.get(id=batch.id).then_job
    jobs = list(Job.objects.filter(batch=batch).order_by("id"))

    assert (then.state, then.pending_dependencies, then.on_dependency_failure, then.batch_id) == (
        "waiting",
        3,
        "run",
        None,
    )
    assert all(job.has_dependents for job in jobs)
    run(jobs[0].id)
    run(jobs[1].id, state=State.DEAD)
    assert state_of(then) == "waiting"
    run(jobs[2].id)

    assert state_of(then) == "queued"
    from jobs.engine.dependencies import batch_counts

    assert batch_counts(then.id) == {
        "id": str(batch.id),
        "total": 3,
        "succeeded": 2,
        "dead": 1,
        "cancelled": 0,
        "discarded": 0,
    }


def test_a_bad_then_job_refuses_the_whole_batch(db):
    from jobs.engine.batches import InvalidBatch

    with pytest.raises(InvalidBatch) as refused:
        submit_batch("b", [{"kind": "demo.noop", "payload": {}}], then={"kind": "demo.sleep", "payload": {}})

    assert [e["field"] for e in refused.value.errors] == ["then.payload.seconds"]
    assert not Batch.objects.exists() and not Job.objects.exists()


def test_finishing_a_batch_job_costs_the_same_whatever_the_batch_size(db):
    """The then-path does O(1) work per finished job: one edge, one counter."""
    statements = []
    for size in (3, 2000):  # the second of each is not the last
        batch = submit_batch(
            f"b{size}", [{"kind": "demo.noop", "payload": {}}] * size, then={"kind": "demo.noop", "payload": {}}
        ).batch
        job, second = Job.objects.filter(batch=batch)[:2]
        run(job.id)  # the first fills the per-process caches (the batch's callback_url)
        transition(second.id, target=State.RUNNING, attempts=1, lease_owner="w")
        with CaptureQueriesContext(connection) as finishing:
            transition(second.id, target=State.SUCCEEDED, finished_at=Sql("now()"))
        statements.append([UUID_TEXT.sub("<id>", query["sql"]) for query in finishing.captured_queries])
    assert statements[0] == statements[1]
    assert len(statements[0]) == 2  # the transition, and the edge with its counter


# --- end to end, with a real cluster ---------------------------------------------


@pytest.mark.processes
def test_a_chain_runs_in_order_and_the_last_step_reads_its_dependencies_results(processes, make_job):
    a = make_job("demo.sleep", {"seconds": 0.3, "steps": 1})
    b = make_job("demo.sleep", {"seconds": 0.1, "steps": 1}, depends_on=[a.id])
    c = make_job("demo.collect", {}, depends_on=[a.id, b.id])
    d = make_job("demo.async_collect", {}, depends_on=[c.id])
    processes.qcluster()

    wait_until(lambda: state_of(d) == "succeeded", timeout=60, interval=0.2, message="the chain to finish")

    a, b, c, d = (Job.objects.get(id=j.id) for j in (a, b, c, d))
    assert a.finished_at <= b.started_at and b.finished_at <= c.started_at and c.finished_at <= d.started_at
    assert c.result == {"dependencies": {str(a.id): {"slept": 0.3}, str(b.id): {"slept": 0.1}}, "batch": None}
    assert d.result == {"dependencies": {str(c.id): c.result}, "batch": None}


@pytest.mark.processes
def test_a_fan_in_of_many_jobs_and_a_failure_policy_end_to_end(processes, make_job):
    parts = [make_job("demo.noop", {}) for _ in range(40)]
    doomed = make_job("demo.fail", {"mode": "permanent"})
    fan_in = make_job("demo.collect", {}, depends_on=[p.id for p in parts])
    cancelled = make_job("demo.collect", {}, depends_on=[parts[0].id, doomed.id])
    anyway = make_job("demo.collect", {}, depends_on=[parts[1].id, doomed.id], on_dependency_failure="run")
    processes.qcluster()

    wait_until(
        lambda: {state_of(fan_in), state_of(anyway)} == {"succeeded"},
        timeout=60,
        interval=0.2,
        message="the fan-in and the run-anyway job",
    )
    fan_in.refresh_from_db()
    assert len(fan_in.result["dependencies"]) == 40
    assert fan_in.started_at >= max(Job.objects.get(id=p.id).finished_at for p in parts)
    cancelled.refresh_from_db()
    assert (cancelled.state, cancelled.error_message) == ("cancelled", f"dependency {doomed.id} ended dead")
    assert Job.objects.get(id=anyway.id).result["dependencies"][str(doomed.id)] is None

    deadletter.retry_job(doomed.id)  # still fails: the re-armed job is cancelled again
    wait_until(lambda: state_of(doomed) == "dead" and state_of(cancelled) == "cancelled", timeout=30, interval=0.2)
    assert JobEvent.objects.filter(job=cancelled, type="job.waiting").count() == 1


@pytest.mark.processes
def test_a_batch_then_job_runs_after_the_batch_with_its_counts(processes):
    jobs = [{"kind": "demo.noop", "payload": {}}] * 20 + [{"kind": "demo.fail", "payload": {"mode": "permanent"}}]
    batch = submit_batch("fan-in", jobs, then={"kind": "demo.collect", "payload": {}}).batch
    processes.qcluster()

    then_id = Batch.objects.get(id=batch.id).then_job_id
    wait_until(lambda: Job.objects.get(id=then_id).state == "succeeded", timeout=60, interval=0.2)

    then = Job.objects.get(id=then_id)
    assert then.result["batch"] == {
        "id": str(batch.id),
        "total": 21,
        "succeeded": 20,
        "dead": 1,
        "cancelled": 0,
        "discarded": 0,
    }
    assert len(then.result["dependencies"]) == 21
    last = max(Job.objects.filter(batch=batch).values_list("finished_at", flat=True))
    assert then.started_at >= last


def test_an_operator_retrying_a_cancelled_dependent_puts_it_back_to_wait(db, make_job):
    a, b = make_job(), make_job()
    c = make_job(depends_on=[a.id, b.id])
    deadletter.cancel_job(c.id)
    run(a.id)

    retried = deadletter.retry_job(c.id)

    assert (retried.state, retried.pending_dependencies) == ("waiting", 1)
    assert _broker_rows(c) == 0
    run(b.id)
    assert state_of(c) == "queued"


# --- the worker's batched finish (the chain's claim statement) ------------------


def _claim_all(worker: str = "w:1") -> dict:
    """Claim every ready demo.noop job of the default queue as a chain does: {job id: broker row}."""
    rows, _ = claims.claim_ready("default", worker, 100, ["demo.noop"])
    return {row[0]: row[-1] for row in rows}


def _shape(statement: str) -> str:
    """The statement with its ids, and its arrays of any length, made alike."""
    return re.sub(r"'\{[^}]*\}'", "'{…}'", UUID_TEXT.sub("<id>", statement))


def _succeeded(rows: dict, ids) -> list[QuietSuccess]:
    return [QuietSuccess(job_id, {"n": 1}, 0.0, 0.001, rows[job_id], dependents=True) for job_id in ids]


def _record(rows: dict, ids, worker: str = "w:1") -> set:
    return claims.claim_ready("default", worker, 0, ["demo.noop"], succeeded=_succeeded(rows, ids))[1]


# Transactional: the broker rows are visible from a now() later than the test
# transaction's own.
@pytest.mark.django_db(transaction=True)
def test_a_chain_records_jobs_with_dependents_in_its_batch_and_the_last_batch_queues_the_then_job():
    """Jobs with a dependent keep the batched success: their edges are resolved
    and the waiting job's counter goes down by the whole batch in one statement,
    whatever the batch's size; the batch that resolves the last edge queues it."""
    batch = submit_batch("b", [{"kind": "demo.noop", "payload": {}}] * 6, then={"kind": "demo.noop", "payload": {}})
    then = Batch.objects.get(id=batch.batch.id).then_job
    rows = _claim_all()
    ids = sorted(rows)
    assert len(ids) == 6

    statements = []
    for part in (ids[:1], ids[1:4]):
        with CaptureQueriesContext(connection) as recording:
            assert _record(rows, part) == set(part)
        # Less the webhooks' per-process cache of subscriptions, read once a second.
        statements.append(
            [_shape(q["sql"]) for q in recording.captured_queries if "jobs_webhookendpoint" not in q["sql"]]
        )
        assert (state_of(then), _broker_rows(then)) == ("waiting", 0)
    assert statements[0] == statements[1]  # one statement for the edges and the counter, whatever the batch
    assert Job.objects.get(id=then.id).pending_dependencies == 2

    assert _record(rows, ids[4:]) == set(ids[4:])
    then.refresh_from_db()
    assert (then.state, then.pending_dependencies, _broker_rows(then)) == ("queued", 0, 1)
    assert set(Job.objects.filter(batch=batch.batch).values_list("state", flat=True)) == {"succeeded"}
    assert list(JobDependency.objects.filter(job=then).values_list("resolved", "outcome").distinct()) == [
        (True, "succeeded")
    ]
    assert JobEvent.objects.filter(job=then, type="job.queued").count() == 1
    assert Job.objects.filter(id=ids[0]).values_list("result", flat=True).get() == {"n": 1}


@pytest.mark.django_db(transaction=True)
def test_a_job_that_got_a_dependent_after_its_claim_is_still_resolved(make_job):
    """The chain expected no dependent (its claim said so): the batched statement
    leaves the job to the one-by-one finish, which resolves the new edge."""
    a = make_job()
    rows = _claim_all()
    waiting = make_job(depends_on=[a.id])
    recorded = claims.claim_ready(
        "default", "w:1", 0, ["demo.noop"], succeeded=[QuietSuccess(a.id, None, 0.0, 0.001, rows[a.id])]
    )[1]
    assert recorded == set()  # the chain records it through `transition` instead
    assert state_of(a) == "running"
    transition(a.id, target=State.SUCCEEDED, where=Sql("lease_owner = %s", "w:1"), finished_at=Sql("now()"))
    assert (state_of(waiting), _broker_rows(waiting)) == ("queued", 1)


@pytest.mark.django_db(transaction=True)
def test_the_last_two_dependencies_finishing_in_two_workers_batches_at_once_queue_the_dependent_once():
    """Worker 1's batch holds the waiting job's row (its counter went from 2 to 1)
    and has not committed; worker 2's batch, finishing the other last job, waits
    for it, then takes the counter to 0 and queues the job: once."""
    batch = submit_batch("b", [{"kind": "demo.noop", "payload": {}}] * 2, then={"kind": "demo.noop", "payload": {}})
    then = Batch.objects.get(id=batch.batch.id).then_job
    rows = {**_claim_all("w:1")}
    first, second = sorted(rows)
    Job.objects.filter(id=second).update(lease_owner="w:2")
    with transaction.atomic():
        assert _record(rows, [first], "w:1") == {first}
        finishing = _in_thread(lambda: _record(rows, [second], "w:2"))
        wait_until(lambda: _blocked_on_a_lock() or finishing.error, timeout=10, message=_activity)
        assert finishing.error is None
        assert state_of(then) == "waiting"
    finishing.join(10)
    assert finishing.error is None

    then.refresh_from_db()
    assert (then.state, then.pending_dependencies, _broker_rows(then)) == ("queued", 0, 1)
    assert JobEvent.objects.filter(job=then, type="job.queued").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_batch_and_a_one_by_one_finish_of_the_last_two_dependencies_queue_the_dependent_once(make_job):
    a, b = make_job(), make_job()
    c = make_job(depends_on=[a.id, b.id])
    rows = _claim_all("w:1")
    with transaction.atomic():
        assert _record(rows, [a.id]) == {a.id}
        finishing = _in_thread(lambda: transition(b.id, target=State.SUCCEEDED, finished_at=Sql("now()")))
        wait_until(lambda: _blocked_on_a_lock() or finishing.error, timeout=10, message=_activity)
        assert finishing.error is None
    finishing.join(10)
    assert finishing.error is None

    c.refresh_from_db()
    assert (c.state, c.pending_dependencies, _broker_rows(c)) == ("queued", 0, 1)
    assert JobEvent.objects.filter(job=c, type="job.queued").count() == 1


# --- a submission naming a waiting job and its own dependency ------------------


@pytest.mark.django_db(transaction=True)
def test_a_submission_naming_a_waiting_job_and_its_finishing_dependency_never_deadlocks(make_job):
    """X waits on A and X's id sorts before A's. The finish of A holds A and
    then takes X (to count it down); the submission naming both must not hold
    X while it waits for A. Here the test's transaction holds A; the submission
    starts and waits; then A finishes in that transaction."""
    while True:
        a = make_job()
        x = make_job(depends_on=[a.id])
        if x.id < a.id:
            break
    transition(a.id, target=State.RUNNING, attempts=1, lease_owner="w")
    submitted = {}
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM jobs_job WHERE id = %s FOR UPDATE", [str(a.id)])
        submitting = _in_thread(lambda: submitted.update(job=make_job(depends_on=[x.id, a.id])))
        wait_until(lambda: _blocked_on_a_lock() or submitting.error, timeout=10, message=_activity)
        # Before the fix the submission held X here: this finish would wait for
        # it while it waits for A, and Postgres would abort one of the two.
        assert transition(a.id, target=State.SUCCEEDED, finished_at=Sql("now()")) is not None
        assert state_of(x) == "queued"
    submitting.join(30)
    assert submitting.error is None

    job = Job.objects.get(id=submitted["job"].id)
    assert (job.state, job.pending_dependencies) == ("waiting", 1)  # A succeeded, X is queued
    assert dict(JobDependency.objects.filter(job=job).values_list("depends_on_id", "resolved")) == {
        x.id: False,
        a.id: True,
    }
    assert Job.objects.filter(id__in=[x.id, a.id], has_dependents=True).count() == 2


@pytest.mark.processes
def test_a_real_cluster_records_a_then_batch_s_jobs_many_to_a_statement(processes):
    """The chain keeps jobs with dependents in its batches: their `job.succeeded`
    events come many to a statement (one statement's now()), not one each."""
    n = 300
    batch = submit_batch(
        "fan-in", [{"kind": "demo.noop", "payload": {}}] * n, then={"kind": "demo.noop", "payload": {}}
    )
    then_id = Batch.objects.get(id=batch.batch.id).then_job_id
    processes.qcluster()

    wait_until(lambda: Job.objects.get(id=then_id).state == "succeeded", timeout=120, interval=0.2)

    events = JobEvent.objects.filter(job__batch_id=batch.batch.id, type="job.succeeded")
    assert events.count() == n
    statements = events.values("created_at").distinct().count()
    assert statements < n / 4, f"{statements} statements recorded the {n} successes"
    then = Job.objects.get(id=then_id)
    assert then.started_at >= max(Job.objects.filter(batch_id=batch.batch.id).values_list("finished_at", flat=True))
    assert JobEvent.objects.filter(job_id=then_id, type="job.queued").count() == 1
