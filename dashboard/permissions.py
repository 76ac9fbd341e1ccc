"""Who may do what on the dashboard."""

from __future__ import annotations

OPERATE = "jobs.operate_job"
SUBMIT = "jobs.add_job"


def can_operate(user) -> bool:
    """Staff with the operate permission may cancel, retry and discard; everyone
    else who is signed in may read."""
    return bool(user and user.is_authenticated and user.is_active and user.is_staff and user.has_perm(OPERATE))


def can_submit(user) -> bool:
    """Submitting needs jobs.add_job (as on the API), or being an operator."""
    return bool(user and user.is_authenticated and user.is_active and (user.has_perm(SUBMIT) or can_operate(user)))


def owner_of(user) -> str:
    """What the dashboard records as the owner of the jobs, batches and
    endpoints `user` creates: "user:<pk>", as the API does for a session, so
    idempotency keys, webhook tenancy and token usage agree on both."""
    return f"user:{user.pk}"
