"""Who is calling /api/v1/events: an API key (Bearer) or a dashboard session."""

from __future__ import annotations

from dataclasses import dataclass

from jobs import services

READ_SCOPE = "read"


@dataclass(frozen=True)
class ApiPrincipal:
    """An authenticated API caller."""

    name: str
    owner: str  # what its jobs are submitted as ("apikey:<id>")
    scopes: frozenset[str]


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
    return ApiPrincipal(name=api_key.name, owner=api_key.owner, scopes=frozenset(api_key.scopes))


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
