"""Workflows: jobs that wait for other jobs (`depends_on`), and fan-in.

A job submitted with `depends_on` is created `waiting`, with one
`JobDependency` edge per dependency and `pending_dependencies`, the number of
edges not yet resolved. Each dependency gets `has_dependents`, which takes it
off the quiet path of `jobs.engine.hooks` (its finish goes through a
transaction) so that `FINISH_HOOK` hears of it:

- the dependency's edges are resolved (with its final state) and each
  dependent's counter goes down, in the transaction of the finishing
  transition; the dependent whose counter reaches 0 is queued there and then
  (waiting -> queued, with its broker row): no poller;
- a dependency that ends `dead`, `cancelled` or `discarded` cancels the
  waiting dependents whose `on_dependency_failure` is "cancel" (the default),
  with a reason naming it; "run" dependents count it as finished;
- a dependency retried from the dead-letter queue (or a cancelled one retried)
  re-arms the dependents it cancelled (cancelled -> waiting), `rearm`.

Every state change goes through `jobs.engine.states.transition`. A finish is
resolved once per edge (`resolved`), so dead -> discarded does not count twice.

Submission locks the dependency rows (`FOR UPDATE`, all or none: it never
waits while holding one, `lock_dependencies`) before it reads their states
and marks them `has_dependents`: a dependency finishing at the same moment
either committed first (and is seen finished) or waits for the submission to
commit and then finds the new edge.

The worker's chain records a batch of successes in one statement
(`jobs.engine.states.claim_ready`); when some had dependents it does so in a
transaction and hands the ids to `Dependencies.jobs_finished`, which resolves
all their edges and counts each dependent down by its share in one more
statement, then queues those that reached 0, before the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.db.models import BooleanField, Case, When

from jobs.db import events
from jobs.db.sql import Sql
from jobs.djangoq import broker
from jobs.engine.states import transition
from jobs.errors import InvalidJob
from jobs.models import ACTIVE_STATES, Batch, Job, JobDependency, State

RESOLVING = frozenset({State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED})
FAILED = frozenset({State.DEAD, State.CANCELLED, State.DISCARDED})
POLICIES = ("cancel", "run")
MAX_DEPENDENCIES = 10_000
DEPENDENCY_FAILED = "DependencyFailed"


# --- submission ------------------------------------------------------------------


def check_policy(policy: Any) -> list[dict[str, str]]:
    if policy not in POLICIES:
        return [{"field": "on_dependency_failure", "message": 'must be "cancel" or "run"'}]
    return []


def parse_ids(depends_on: Sequence[Any]) -> list[uuid.UUID]:
    """The ids of `depends_on`, or InvalidJob naming each bad item (`depends_on[2]`)."""
    if isinstance(depends_on, (str, bytes)) or not isinstance(depends_on, Sequence):
        raise InvalidJob([{"field": "depends_on", "message": "must be a list of job ids"}])
    if len(depends_on) > MAX_DEPENDENCIES:
        raise InvalidJob([{"field": "depends_on", "message": f"must list at most {MAX_DEPENDENCIES} jobs"}])
    ids, errors, seen = [], [], set()
    for index, value in enumerate(depends_on):
        try:
            job_id = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        except ValueError:
            errors.append({"field": f"depends_on[{index}]", "message": "is not a job id"})
            continue
        if job_id in seen:
            errors.append({"field": f"depends_on[{index}]", "message": "lists the same job twice"})
        seen.add(job_id)
        ids.append(job_id)
    if errors:
        raise InvalidJob(errors[:100])
    return ids


def lock_dependencies(ids: list[uuid.UUID], *, visible_to: str | None) -> dict[uuid.UUID, str]:
    """Lock the dependency rows and return their states; call in the
    submission's transaction. Mark them `has_dependents`.

    All or none: the rows are taken with SKIP LOCKED, and when one is busy
    (a dependency finishing) the submission lets go of the others and waits
    for that one alone before it tries again. It never waits while holding
    one of them, so it cannot deadlock with a finish, which holds its job's
    row and then takes its dependents' (a waiting job named beside its own
    dependency, in any id order).

    `visible_to`: only that owner's jobs count (another tenant's id is unknown).
    Raises InvalidJob naming each unknown id."""
    owner = [visible_to, visible_to]
    with connection.cursor() as cursor:
        while True:
            attempt = transaction.savepoint()
            cursor.execute(
                "WITH l AS (SELECT id, state FROM jobs_job WHERE id = ANY(%s::uuid[])"
                " AND (%s::text IS NULL OR owner = %s) ORDER BY id FOR UPDATE SKIP LOCKED)"
                " , u AS (UPDATE jobs_job SET has_dependents = true FROM l WHERE jobs_job.id = l.id"
                " AND NOT jobs_job.has_dependents)"
                " SELECT id, state FROM l",
                [ids, *owner],
            )
            found = dict(cursor.fetchall())
            missing = [job_id for job_id in ids if job_id not in found]
            if missing:
                cursor.execute(
                    "SELECT id FROM jobs_job WHERE id = ANY(%s::uuid[]) AND (%s::text IS NULL OR owner = %s)"
                    " ORDER BY id LIMIT 1",
                    [missing, *owner],
                )
                busy = cursor.fetchone()
                if busy is not None:
                    transaction.savepoint_rollback(attempt)  # lets go of the rows it took
                    waiting = transaction.savepoint()
                    cursor.execute("SELECT 1 FROM jobs_job WHERE id = %s FOR UPDATE", [busy[0]])
                    transaction.savepoint_rollback(waiting)
                    continue
            transaction.savepoint_commit(attempt)
            break
    unknown = [
        {"field": f"depends_on[{index}]", "message": f"no job with id {job_id}"}
        for index, job_id in enumerate(ids)
        if job_id not in found
    ]
    if unknown:
        raise InvalidJob(unknown[:100])
    return found


def link(job: Job, states: dict[uuid.UUID, str]) -> Job:
    """Write the edges of the new `waiting` job `job` to its (locked) dependencies,
    with those already finished resolved, then settle it: queued at once when
    none is pending, cancelled when a failed one cancels it."""
    JobDependency.objects.bulk_create(
        [
            JobDependency(
                job=job,
                depends_on_id=dep,
                resolved=state in RESOLVING,
                outcome=state if state in RESOLVING else "",
            )
            for dep, state in states.items()
        ]
    )
    failed = [dep for dep, state in states.items() if state in FAILED]
    if failed and job.on_dependency_failure == "cancel":
        return _cancel(job.id, failed[0], states[failed[0]]) or job
    if job.pending_dependencies == 0:
        return _release(job.id, reason="dependencies finished") or job
    return job


# --- the finish hook -------------------------------------------------------------


class Dependencies:
    """The workflows' `jobs.engine.hooks.FinishHook`."""

    event_states = RESOLVING

    @staticmethod
    def quiet_condition(target: State) -> Sql | None:
        return Sql("NOT jobs_job.has_dependents")

    @staticmethod
    def job_finished(job: Job) -> None:
        if job.has_dependents:
            resolve(job)

    @staticmethod
    def batch_condition(target: State) -> Sql | None:
        # Successes only: a failure may cancel dependents, naming the one
        # dependency that did (`resolve`).
        return Sql("true") if target == State.SUCCEEDED else Sql("NOT jobs_job.has_dependents")

    @staticmethod
    def jobs_finished(target: State, ids: list[uuid.UUID]) -> None:
        if target == State.SUCCEEDED:
            _resolve(ids, State.SUCCEEDED)


FINISH_HOOK = Dependencies()


def resolve(job: Job) -> None:
    """`job` finished (its state is final for now): resolve its open edges,
    count down its dependents and queue or cancel those it decides.
    Call inside the transaction of its transition."""
    _resolve([job.id], State(job.state))


# Every open edge of the finished jobs, and each dependent's counter down by
# the number of its edges among them: one statement for a whole batch of the
# worker's successes. The dependents are locked in id order, as every path
# that changes their counters locks them.
_RESOLVE = (
    "WITH e AS (UPDATE jobs_jobdependency SET resolved = true, outcome = %s"
    " WHERE depends_on_id = ANY(%s::uuid[]) AND NOT resolved RETURNING job_id),"
    " c AS (SELECT job_id, count(*) AS n FROM e GROUP BY job_id),"
    " l AS (SELECT jobs_job.id, c.n FROM jobs_job JOIN c ON c.job_id = jobs_job.id"
    " ORDER BY jobs_job.id FOR UPDATE OF jobs_job)"
    " UPDATE jobs_job SET pending_dependencies = greatest(pending_dependencies - l.n, 0)"
    " FROM l WHERE jobs_job.id = l.id"
    " RETURNING jobs_job.id, jobs_job.pending_dependencies, jobs_job.state, jobs_job.on_dependency_failure"
)


def _resolve(ids: list[uuid.UUID], outcome: State) -> None:
    """The jobs `ids` all ended `outcome` (a failure: one job, whose id the
    cancelled dependents' reason names)."""
    if outcome in FAILED and len(ids) != 1:
        raise ValueError("failed dependencies are resolved one at a time")
    with connection.cursor() as cursor:
        cursor.execute(_RESOLVE, [outcome.value, [str(job_id) for job_id in ids]])
        dependents = sorted(cursor.fetchall())
    for dependent, pending, state, policy in dependents:
        if state != State.WAITING:
            continue
        if outcome in FAILED and policy == "cancel":
            _cancel(dependent, ids[0], outcome)
        elif pending == 0:
            _release(dependent, reason="dependencies finished")


def rearm(job_id: uuid.UUID | str) -> int:
    """`job_id` was retried: the dependents it cancelled wait for it again
    (cancelled -> waiting), unless another failed dependency still cancels
    them; their own dependents cancelled with them are re-armed in turn.
    Call inside the transaction of the retry. Returns how many were re-armed."""
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH e AS (UPDATE jobs_jobdependency SET resolved = false, outcome = '', cancelled_job = false"
            " WHERE depends_on_id = %s AND cancelled_job RETURNING job_id),"
            " l AS (SELECT id FROM jobs_job WHERE id IN (SELECT job_id FROM e) ORDER BY id FOR UPDATE)"
            " UPDATE jobs_job SET pending_dependencies = pending_dependencies + 1"
            " FROM l WHERE jobs_job.id = l.id RETURNING jobs_job.id",
            [str(job_id)],
        )
        dependents = sorted(row[0] for row in cursor.fetchall())
    rearmed = 0
    for dependent in dependents:
        other = (
            JobDependency.objects.filter(job_id=dependent, resolved=True, outcome__in=[s.value for s in FAILED])
            .order_by("id")
            .first()
        )
        if other is not None and Job.objects.filter(id=dependent, on_dependency_failure="cancel").exists():
            # Still cancelled, now for that one: its retry re-arms the job.
            JobDependency.objects.filter(id=other.id).update(cancelled_job=True)
            continue
        waiting = transition(
            dependent,
            target=State.WAITING,
            source=frozenset({State.CANCELLED}),
            event_data={"reason": "dependency retried", "dependency": str(job_id)},
            finished_at=None,
            error_type="",
            error_message="",
        )
        if waiting is not None:
            rearmed += 1
            rearm(dependent)
            if waiting.pending_dependencies == 0:
                _release(dependent, reason="dependencies finished")
    return rearmed


def _cancel(job_id: uuid.UUID | str, dependency: uuid.UUID | str, outcome: State | str) -> Job | None:
    reason = f"dependency {dependency} ended {State(outcome).value}"
    cancelled = transition(
        job_id,
        target=State.CANCELLED,
        source=frozenset({State.WAITING}),
        event_data={"reason": reason, "dependency": str(dependency)},
        finished_at=Sql("now()"),
        error_type=DEPENDENCY_FAILED,
        error_message=reason,
    )
    if cancelled is not None:
        JobDependency.objects.filter(job_id=job_id, depends_on_id=dependency).update(cancelled_job=True)
    return cancelled


def _release(job_id: uuid.UUID | str, *, reason: str) -> Job | None:
    queued = transition(job_id, target=State.QUEUED, source=frozenset({State.WAITING}), event_data={"reason": reason})
    if queued is not None:
        broker.enqueue(
            queued.id, queue=queued.queue, timeout=queued.timeout, run_at=queued.run_after, priority=queued.priority
        )
    return queued


# --- reading ---------------------------------------------------------------------


def dependency_results(job_id: uuid.UUID | str) -> dict[str, Any]:
    """{dependency id: its result} (None for one that did not succeed)."""
    rows = JobDependency.objects.filter(job_id=job_id).values_list("depends_on_id", "depends_on__result")
    return {str(dep): result for dep, result in rows}


def batch_counts(job_id: uuid.UUID | str) -> dict[str, Any] | None:
    """For the `then` job of a batch: {"id", "total", "succeeded", "dead",
    "cancelled", "discarded"} of that batch; None for any other job. One
    count over the batch's jobs, when the then-job asks (not per finished job)."""
    batch = Batch.objects.filter(then_job_id=job_id).first()
    if batch is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT state, count(*) FROM jobs_job WHERE batch_id = %s GROUP BY state", [str(batch.id)])
        by_state = dict(cursor.fetchall())
    return {
        "id": str(batch.id),
        "total": batch.total,
        **{state: by_state.get(state, 0) for state in ("succeeded", "dead", "cancelled", "discarded")},
    }


@dataclass(frozen=True)
class Workflow:
    """What a job's page shows of its workflow: up to `limit` dependencies and
    dependents each (id, kind, state), with their totals."""

    dependencies: list[Job]
    dependencies_total: int
    dependents: list[Job]
    dependents_total: int

    @property
    def related(self) -> set[uuid.UUID]:
        return {job.id for job in (*self.dependencies, *self.dependents)}

    def __bool__(self) -> bool:
        return bool(self.dependencies_total or self.dependents_total)


def workflow_of(job_id: uuid.UUID | str, *, limit: int = 50) -> Workflow:
    """The job's dependencies and dependents, the unfinished ones first."""
    fields = ("id", "kind", "state", "updated_at")
    order = ("-is_active", "created_at", "id")
    active = Case(
        When(state__in=[s.value for s in ACTIVE_STATES], then=True), default=False, output_field=BooleanField()
    )
    dependencies = Job.objects.filter(dependent_edges__job_id=job_id).annotate(is_active=active)
    dependents = Job.objects.filter(dependency_edges__depends_on_id=job_id).annotate(is_active=active)
    return Workflow(
        dependencies=list(dependencies.only(*fields).order_by(*order)[:limit]),
        dependencies_total=JobDependency.objects.filter(job_id=job_id).count(),
        dependents=list(dependents.only(*fields).order_by(*order)[:limit]),
        dependents_total=JobDependency.objects.filter(depends_on_id=job_id).count(),
    )


def then_after_batch(batch: Batch, fields: dict[str, Any], *, owner: str) -> Job:
    """Create the `then` job of `batch` (prepared `fields`): `waiting` on every
    job of the batch, whatever their outcome (policy "run"), with one edge each
    in one INSERT … SELECT. Call in the batch's transaction, after its jobs were
    inserted with `has_dependents` (so none can have finished yet)."""
    job = Job(
        owner=owner,
        **{**fields, "state": State.WAITING, "pending_dependencies": batch.total, "on_dependency_failure": "run"},
    )
    job.save(force_insert=True)
    events.record(
        job.id, "job.created", {"state": job.state, "kind": job.kind, "batch": str(batch.id)}, queue=job.queue
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs_jobdependency (job_id, depends_on_id, resolved, outcome, cancelled_job)"
            " SELECT %s, id, false, '', false FROM jobs_job WHERE batch_id = %s",
            [str(job.id), str(batch.id)],
        )
    Batch.objects.filter(id=batch.id).update(then_job=job)
    batch.then_job = job
    return job
