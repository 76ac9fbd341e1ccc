"""The credentials of open streams: what a stream was let in with, and
whether it is still good (the hub re-checks them all in one batch)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, get_user_model
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from jobs.models import ApiKey


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
