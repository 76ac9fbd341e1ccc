"""Who is calling: an API key (`Authorization: Bearer cvk_…`) or a logged-in
dashboard user (session cookie + CSRF token), and whether they may.

Scopes: `read` for GETs, `submit` to create jobs and batches, `operate` to
cancel, retry and discard. A key carries its scopes; a user has `read`, and
`submit`/`operate` through the `jobs.add_job`/`jobs.operate_job` permissions
(a superuser has all).

Tenancy: an API key sees only the jobs and batches it submitted (and their
events and deliveries), unless it has the `operate` scope, which is for
operators and sees everything. Dashboard users see everything. What a caller
may not see answers 404, exactly as what does not exist, so ids do not leak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from jobs import services
from jobs.api.problems import Problem
from jobs.models import ApiKey

USER_PERMISSIONS = {"read": None, "submit": "jobs.add_job", "operate": "jobs.operate_job"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True)
class Caller:
    owner: str  # "apikey:<id>" or "user:<id>": whose idempotency keys these are
    actor: str  # how event logs name them
    sees_all: bool  # an operator (a key with `operate`, any dashboard user)

    @property
    def visible_owner(self) -> str | None:
        """The owner this caller's reads are limited to; None: everything."""
        return None if self.sees_all else self.owner


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer <key>`. A key that is there but wrong is a 401 at
    once: we do not fall back to the session for it."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__()

    def __call__(self, request: HttpRequest) -> Caller | None:
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.authenticate(request, token.strip())

    def authenticate(self, request: HttpRequest, token: str) -> Caller:
        api_key = services.verify_api_key(token)
        if api_key is None:
            raise Problem(
                "not-authenticated",
                "The API key is unknown or revoked.",
                headers={"WWW-Authenticate": 'Bearer realm="conveyor", error="invalid_token"'},
            )
        if self.scope not in api_key.scopes:
            raise Problem("forbidden", f"This API key lacks the {self.scope!r} scope.")
        return _caller_of_key(api_key)


class SessionAuth(APIKeyCookie):
    """The dashboard's login session; unsafe methods need the CSRF token."""

    param_name = settings.SESSION_COOKIE_NAME

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(csrf=False)  # checked below, only once we know there is a user

    def __call__(self, request: HttpRequest) -> Caller | None:
        return self.authenticate(request, None)

    def authenticate(self, request: HttpRequest, key: Any) -> Caller | None:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if request.method not in SAFE_METHODS and check_csrf(request) is not None:
            raise Problem("csrf-failed", "CSRF token missing or incorrect: send it in the X-CSRFToken header.")
        permission = USER_PERMISSIONS[self.scope]
        if permission and not user.has_perm(permission):
            raise Problem("forbidden", f"You lack the {permission!r} permission this operation needs.")
        return Caller(owner=f"user:{user.pk}", actor=f"user:{user.get_username()}", sees_all=True)


def require(scope: str) -> list:
    """The auth of an operation that needs `scope`."""
    if scope not in USER_PERMISSIONS:
        raise ValueError(f"unknown scope {scope!r}")
    return [ApiKeyAuth(scope), SessionAuth(scope)]


def _caller_of_key(api_key: ApiKey) -> Caller:
    return Caller(owner=api_key.owner, actor=f"apikey:{api_key.name}", sees_all=sees_all(api_key.scopes))


def sees_all(scopes) -> bool:
    """Whether a key with `scopes` reads every owner's jobs (see the module docstring)."""
    return "operate" in scopes
