"""API keys: create (the key is shown once), verify, revoke.

A key reads `cvk_<prefix><secret>`: 8 random characters that find the row,
then 32 that prove the caller holds it. Only the SHA-256 digest of the whole
key is stored. A slow password hash would add nothing here: the key is random
(about 238 bits), not chosen by a person, so there is no dictionary to guess
from.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.db import sql
from jobs.errors import ConveyorError
from jobs.models import ApiKey

KEY_PREFIX = "cvk_"
SCOPES = tuple(ApiKey.Scope.values)
_ALPHABET = string.ascii_letters + string.digits
_PREFIX_LENGTH = 8
_SECRET_LENGTH = 32
# last_used_at is a hint for operators, not an audit log: writing it on every
# request would make all requests with one key queue on that key's row lock.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiKeyNotFound(ConveyorError):
    code = "api-key-not-found"


@dataclass(frozen=True)
class CreatedApiKey:
    api_key: ApiKey
    key: str  # the only time the key exists in clear


def create_api_key(name: str, *, scopes: Iterable[str] = SCOPES) -> CreatedApiKey:
    """Create a key with `scopes` (any of submit, read, operate); raises ValueError
    for an empty name or an unknown scope."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValueError("the name must be 1-100 characters")
    scopes = sorted(set(scopes))
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    # A prefix collision is a 1 in 62**8 event; the unique constraint turns it
    # into an IntegrityError and we draw again.
    for _ in range(5):
        prefix = _random(_PREFIX_LENGTH)
        key = f"{KEY_PREFIX}{prefix}{_random(_SECRET_LENGTH)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(name=name, prefix=prefix, hashed_key=_digest(key), scopes=scopes)
        except IntegrityError:
            continue
        return CreatedApiKey(api_key, key)
    raise RuntimeError("could not draw a unique key prefix")


def verify_api_key(key: str) -> ApiKey | None:
    """The active key `key` names, or None (unknown, malformed or revoked)."""
    return verify_api_keys([key])[key]


def verify_api_keys(keys: Iterable[str]) -> dict[str, ApiKey | None]:
    """`verify_api_key` for each of `keys`, in one query."""
    found: dict[str, ApiKey | None] = dict.fromkeys(keys)
    prefixes = {_prefix_of(key) for key in found} - {None}
    if not prefixes:
        return found
    # A prepared statement: the submission intake runs this for every group of requests.
    with sql.cursor() as cursor:
        cursor.execute(_active_by_prefix(), [sorted(prefixes)])
        rows = {api_key.prefix: api_key for api_key in (sql.model_from_row(ApiKey, row) for row in cursor.fetchall())}
    now = timezone.now()
    for key in found:
        api_key = rows.get(_prefix_of(key))
        if api_key is None or not hmac.compare_digest(api_key.hashed_key, _digest(key)):
            continue
        if api_key.last_used_at is None or api_key.last_used_at < now - _LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
            api_key.last_used_at = now
        found[key] = api_key
    return found


@functools.cache
def _active_by_prefix() -> str:
    return f"SELECT {sql.model_columns(ApiKey)[0]} FROM jobs_apikey WHERE prefix = ANY(%s) AND revoked_at IS NULL"


def _prefix_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX) or len(key) != len(KEY_PREFIX) + _PREFIX_LENGTH + _SECRET_LENGTH:
        return None
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + _PREFIX_LENGTH]


def revoke_api_key(key_or_prefix: str) -> ApiKey:
    """Revoke the key named by its prefix (`cvk_AbCd1234`, as printed at creation,
    with or without `cvk_`) or by the whole key. Revoking twice is harmless.

    Raises ApiKeyNotFound.
    """
    value = key_or_prefix.strip().removeprefix(KEY_PREFIX)[:_PREFIX_LENGTH]
    api_key = ApiKey.objects.filter(prefix=value).first() if len(value) == _PREFIX_LENGTH else None
    if api_key is None:
        raise ApiKeyNotFound(f"no API key with prefix {KEY_PREFIX}{value}")
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db()
    return api_key


def display_prefix(api_key: ApiKey) -> str:
    return f"{KEY_PREFIX}{api_key.prefix}"


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
