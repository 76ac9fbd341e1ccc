"""Who is calling /api/v1/events: an API key (Bearer) or a dashboard session;
and whether the credentials of open streams are still good."""

from __future__ import annotations

from dataclasses import dataclass

# The stream credentials live in dashboard.live (the hub re-checks them); the consumers take them from here.
from dashboard.live.credentials import Credential, invalid_credentials, session_credential  # noqa: F401
from jobs import services
from jobs.api.auth import sees_all

READ_SCOPE = "read"


@dataclass(frozen=True)
class ApiPrincipal:
    """An authenticated API caller."""

    name: str
    owner: str  # what its jobs are submitted as ("apikey:<id>")
    scopes: frozenset[str]
    key_id: int

    @property
    def visible_owner(self) -> str | None:
        """Whose jobs' events it may watch; None: everyone's (the REST API's
        tenancy rule, jobs/api/auth.py)."""
        return None if sees_all(self.scopes) else self.owner


def authenticate_bearer(token: str) -> ApiPrincipal | None:
    """The hook for the REST API's key check: the principal a Bearer token names,
    or None for an unknown, malformed or revoked key.

    The one place the SSE endpoint checks keys; it defers to the API's own
    check (`jobs.services.verify_api_key`), so keys mean the same on both.
    Runs in a thread: it uses the ORM.
    """
    api_key = services.verify_api_key(token)
    if api_key is None:
        return None
    return ApiPrincipal(name=api_key.name, owner=api_key.owner, scopes=frozenset(api_key.scopes), key_id=api_key.pk)


def owns_job(job_id, owner: str | None) -> bool:
    """Whether a caller limited to `owner` (None: no limit) may watch the job."""
    try:
        services.get_job(job_id, owner=owner)
    except services.JobNotFound:
        return False
    return True


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
