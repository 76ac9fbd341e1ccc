"""Django cursors whose statements Postgres prepares (used by jobs/db/sql.py).

Django sends every query as text with its parameters merged in client-side.
`prepared(db)` wraps a psycopg `ServerBindingCursor` of the connection in a
Django `CursorWrapper` whose `_execute` asks psycopg to prepare the statement:
errors still become Django's, the connection's transaction applies, and
queries are logged when Django logs them.

`CursorWrapper._execute(self, sql, params, *ignored_wrapper_args)` and
`CursorDebugWrapper.debug_sql` are Django internals: this is written for
Django 5.2.19 (and psycopg's `prepare=True`, `prepare_threshold`). On any other
version `prepared()` returns None and the caller uses Django's own cursor
(config/server/patching.py).
"""

from __future__ import annotations

from typing import Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from config.server.patching import guarded

NAME = "django-prepared-cursor"
PACKAGE = "Django"
VERSIONS = ("5.2.19",)
ALSO = {"psycopg": ("3.3.9",)}

# psycopg prepares nothing while the threshold is None (Django's default, for
# poolers); a threshold no query reaches prepares only what asks to be.
_ONLY_WHEN_ASKED = 2**31 - 1


class _Prepared(CursorWrapper):
    def _execute(self, sql, params, *ignored_wrapper_args):
        self.db.validate_no_broken_transaction()
        with self.db.wrap_database_errors:
            return self.cursor.execute(sql, params, prepare=True)


class _PreparedDebug(CursorDebugWrapper, _Prepared):
    def execute(self, sql, params=None):
        # Logged as written: Django's last_executed_query() reads the text a
        # client-side cursor composed, and a prepared statement has none.
        with self.debug_sql(sql, params):
            return super(CursorDebugWrapper, self).execute(sql, params)


def available() -> bool:
    """Whether this Django is the one the prepared cursor was written for."""
    return guarded(NAME, package=PACKAGE, versions=VERSIONS, also=ALSO, install=lambda: None)


def prepared(db: Any) -> CursorWrapper | None:
    """A prepared-statement cursor of the Postgres connection `db` (a Django
    DatabaseWrapper), or None on a Django it was not written for."""
    if not available():
        return None
    wrapper = _PreparedDebug if db.queries_logged else _Prepared
    return wrapper(_server_cursor(db), db)


def _server_cursor(db: Any) -> Any:
    from django.db.backends.postgresql.base import ServerBindingCursor

    db.close_if_health_check_failed()
    db.ensure_connection()
    with db.wrap_database_errors:
        db.validate_thread_sharing()
        raw = db.connection
        if raw.prepare_threshold is None:
            raw.prepare_threshold = _ONLY_WHEN_ASKED
        return ServerBindingCursor(raw)


def fetchone(db: Any, sql: str, params: Any) -> tuple | None:
    """Run `sql` prepared on `db` and return its first row, or None, through
    one psycopg cursor the connection keeps for this (a fresh cursor looks up
    a dumper for each parameter type again). No caller holds that cursor
    between the execute and the fetch, so none can see another's rows. As
    `prepared(db)`'s cursor otherwise: the connection's transaction applies,
    errors become Django's, queries are logged when Django logs them and the
    connection's execute wrappers run.
    Call only when `available()`."""
    shared = getattr(db, "_conveyor_shared_cursor", None)
    if shared is None or shared.connection is not db.connection or db.connection is None:
        shared = db._conveyor_shared_cursor = _server_cursor(db)
    else:
        db.close_if_health_check_failed()
        if db.connection is None:  # closed by the health check: a cursor of the new connection
            shared = db._conveyor_shared_cursor = _server_cursor(db)
        else:
            db.validate_thread_sharing()
    if db.queries_logged or db.execute_wrappers:
        # Django's path, which logs the query and runs the connection's
        # execute wrappers (jobs.db.durability's, around a handler's writes).
        wrapper = (_PreparedDebug if db.queries_logged else _Prepared)(shared, db)
        wrapper.execute(sql, params)
        return wrapper.fetchone()
    db.validate_no_broken_transaction()
    with db.wrap_database_errors:
        shared.execute(sql, params, prepare=True)
        return shared.fetchone()
