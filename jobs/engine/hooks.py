"""What features hear of the engine's transitions, so the engine imports no feature.

A feature (webhooks today) registers one `FinishHook` from its
`AppConfig.ready()`. The state machine and the worker's batched transitions
ask the registry, never the feature:

- `finish_states()`: the states whose entry a hook wants to hear of;
- `quiet_condition(target)`: SQL that holds for a job row that no hook needs
  to hear of when it enters `target` (None when any row may need one), so
  such a row can move in one statement outside a transaction;
- `job_finished(job)`: called with the updated row, inside the transaction
  of the change, for every other row.

A hook may also take many rows at once (the worker's batched successes,
`jobs.engine.states.claim_ready`), with two optional methods:

- `batch_condition(target)`: SQL that holds for a row it can hear of in bulk
  (None: as `quiet_condition`);
- `jobs_finished(target, ids)`: called once with the ids of the rows that
  entered `target` in one statement, inside that statement's transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from jobs.db.sql import Sql

if TYPE_CHECKING:
    from jobs.models import Job, State


class FinishHook(Protocol):
    event_states: frozenset[State]

    def quiet_condition(self, target: State) -> Sql | None: ...

    def job_finished(self, job: Job) -> None: ...

    # Optional: def batch_condition(self, target: State) -> Sql | None
    # and def jobs_finished(self, target: State, ids: list) -> None (see above).


_hooks: list[FinishHook] = []
_states: frozenset = frozenset()


def register(hook: FinishHook) -> None:
    """Add `hook` (idempotent: `ready()` may run more than once in tests)."""
    global _states
    if hook not in _hooks:
        _hooks.append(hook)
        _states = _states | hook.event_states


def finish_states() -> frozenset:
    return _states


def quiet_condition(target: State) -> Sql | None:
    """The conjunction of every interested hook's quiet condition; None when
    one of them has none (any row may need it)."""
    return _conjunction(target, lambda hook: hook.quiet_condition(target))


def batch_condition(target: State) -> Sql | None:
    """The conjunction of every interested hook's condition for rows that
    enter `target` many to a statement, in a transaction that then calls
    `jobs_finished` (its `quiet_condition` for a hook that takes no batch)."""
    return _conjunction(
        target,
        lambda hook: hook.batch_condition(target) if hasattr(hook, "jobs_finished") else hook.quiet_condition(target),
    )


def _conjunction(target: State, condition_of) -> Sql | None:
    conditions = []
    for hook in _hooks:
        if target in hook.event_states:
            condition = condition_of(hook)
            if condition is None:
                return None
            conditions.append(condition)
    if not conditions:
        return Sql("true")
    if len(conditions) == 1:
        return conditions[0]
    return Sql(" AND ".join(f"({c.expression})" for c in conditions), *[p for c in conditions for p in c.params])


def job_finished(job: Job) -> None:
    for hook in _hooks:
        if job.state in hook.event_states:
            hook.job_finished(job)


def jobs_finished(target: State, ids: list) -> None:
    """The rows `ids` entered `target` in one statement that `batch_condition`
    selected; call inside its transaction."""
    for hook in _hooks:
        if target in hook.event_states and hasattr(hook, "jobs_finished"):
            hook.jobs_finished(target, ids)
