"""Who is calling /api/v1/events: an API key (Bearer) or a dashboard session;
and whether the credentials of open streams are still good."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, get_user_model
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from jobs import services
from jobs.api.auth import sees_all
from jobs.models import ApiKey

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


# --- credentials of open streams ------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What an open stream was let in with: an API key, or a user's session
    (with the session's password hash, so that a password change counts)."""

    api_key_id: int | None = None
    user_id: Any = None
    session_key: str | None = None
    auth_hash: str | None = None


def session_credential(scope: dict[str, Any]) -> Credential:
    """The credential of a request signed in by session. Runs in a thread:
    the session may not be loaded yet."""
    session = scope["session"]
    return Credential(
        user_id=scope["user"].pk, session_key=session.session_key, auth_hash=session.get(HASH_SESSION_KEY)
    )


def invalid_credentials(credentials: Collection[Credential]) -> set[Credential]:
    """Those of `credentials` no longer good: a revoked or deleted key; a
    session logged out or expired; a user deactivated, deleted or whose
    password changed. At most three queries, however many streams."""
    bad: set[Credential] = set()
    keys = [c for c in credentials if c.api_key_id is not None]
    if keys:
        live = set(
            ApiKey.objects.filter(pk__in={c.api_key_id for c in keys}, revoked_at__isnull=True).values_list(
                "pk", flat=True
            )
        )
        bad.update(c for c in keys if c.api_key_id not in live)
    sessions = [c for c in credentials if c.api_key_id is None]
    if sessions:
        model = import_module(settings.SESSION_ENGINE).SessionStore.get_model_class()
        open_sessions = set(
            model.objects.filter(
                session_key__in={c.session_key for c in sessions}, expire_date__gt=timezone.now()
            ).values_list("session_key", flat=True)
        )
        users = {
            user.pk: user
            for user in get_user_model().objects.filter(pk__in={c.user_id for c in sessions}, is_active=True)
        }
        hashes: dict[Any, str] = {}
        for credential in sessions:
            user = users.get(credential.user_id)
            if credential.session_key not in open_sessions or user is None:
                bad.add(credential)
                continue
            if user.pk not in hashes:
                hashes[user.pk] = user.get_session_auth_hash()
            if credential.auth_hash is not None and not constant_time_compare(credential.auth_hash, hashes[user.pk]):
                bad.add(credential)
    return bad
