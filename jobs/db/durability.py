"""How durable the workers' own writes need to be.

Submissions and operator actions commit with Postgres' default
`synchronous_commit = on`: a job a client was given an id for is never lost.

The workers' writes (broker claims and acknowledgements, job claims, progress
and outcomes) commit with `synchronous_commit = off`: they return without
waiting for the WAL flush, which is most of a commit's cost. If Postgres itself
crashes, the last fraction of a second of such writes can be rolled back —
never partially, and never a later write without the earlier ones — so the
affected jobs look claimed-but-unfinished or not yet claimed, and are
delivered and run again: the at-least-once guarantee every handler is written
for. No data is corrupted and no job is lost. Behind a transaction pooler
(settings.DATABASE_POOLED) nothing is relaxed: a session SET would outlive the
transaction on a server connection other clients get next.

Handlers run on the same connection (a sync handler on the worker's thread, an
async handler's `run_db` on the lane's database thread), and what a handler
writes for itself is not the engine's to relax: `handler_writes()` gives the
connection back the server's setting before the handler's first statement
(none at all for a handler that does not touch the database), and the engine's
next `relax_commit_durability()` relaxes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

from django.conf import settings
from django.db import connection
from psycopg.pq import TransactionStatus

# thread -> the raw connection already relaxed. Django's connections are per
# thread, and a worker has several (its main thread, the lane's database
# thread): one slot per thread, so they don't evict each other and re-send the
# SET on every call. The object itself, not its id: a new connection may get
# a closed one's address.
_relaxed: dict[int, object] = {}
_local = threading.local()


def relax_commit_durability() -> None:
    """Turn off the commit flush wait for this thread's Django connection."""
    connection.ensure_connection()
    raw = connection.connection
    thread = threading.get_ident()
    if _relaxed.get(thread) is raw:
        return
    if settings.DATABASE_POOLED:
        # Behind a transaction pooler a session SET would stay on whichever
        # server connection ran it, for other clients; and most of these
        # writes are single autocommit statements, where a SET LOCAL has no
        # transaction to apply to. They commit as the server says.
        return
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    _relaxed[thread] = raw  # a reconnect replaces the old connection


@contextlib.contextmanager
def handler_writes() -> Iterator[None]:
    """Around a handler's code: its statements on this thread's connection
    commit with the server's `synchronous_commit`, except the engine's own
    (inside `engine_statements()`, e.g. its progress reports)."""
    with connection.execute_wrapper(_as_the_server_says):
        yield


@contextlib.contextmanager
def engine_statements() -> Iterator[None]:
    """Mark statements the engine makes while a handler runs."""
    outer = getattr(_local, "engine", False)
    _local.engine = True
    try:
        yield
    finally:
        _local.engine = outer


def _as_the_server_says(execute, sql, params, many, context):
    if not getattr(_local, "engine", False):
        _restore(context["connection"])
    return execute(sql, params, many, context)


def _restore(db) -> None:
    raw = db.connection
    thread = threading.get_ident()
    if raw is None or _relaxed.get(thread) is not raw:
        return
    status = raw.info.transaction_status
    if status == TransactionStatus.IDLE:
        _local.local_in = None  # between transactions: whatever was set locally is gone
    if db.get_autocommit():
        with db.wrap_database_errors:
            raw.execute("SET synchronous_commit TO DEFAULT")
        del _relaxed[thread]
    elif status in (TransactionStatus.IDLE, TransactionStatus.INTRANS) and getattr(_local, "local_in", None) != id(raw):
        # The handler's own transaction (psycopg opens it with this
        # statement): its commit waits for the flush. SET LOCAL, because a
        # session-level SET would be undone with a rollback, unnoticed here.
        with db.wrap_database_errors:
            raw.execute("SET LOCAL synchronous_commit TO DEFAULT")
        _local.local_in = id(raw)


# --- showing only what a crash cannot take back ------------------------------
#
# A reader (the event hub, an SSE replay) can see a worker's write as soon as
# it commits, before its WAL is flushed: a crash could still roll it back, and
# an SSE client would keep an event the log no longer has (its id perhaps
# reused for another). So readers wait, before passing rows on, until the WAL
# is flushed up to where it was when they read them. The walwriter flushes
# asynchronous commits only every `wal_writer_delay` (200 ms by default), too
# late for a live page, so a reader that finds the WAL unflushed commits a
# transaction of its own with `synchronous_commit` on (FORCE_FLUSH): its commit
# returns once the WAL is flushed past it, and so past what the reader saw.

# The WAL insert position now (every commit the reader saw is before it), and
# whether it is already flushed.
WAL_NOW = "SELECT lsn::text, pg_current_wal_flush_lsn() >= lsn FROM (SELECT pg_current_wal_insert_lsn() AS lsn) AS now"
FLUSHED = "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn"
# A transactional logical-decoding message is the cheapest write any role may
# make (no table, nothing for a decoder unless one subscribes to the prefix):
# its autocommit transaction wrote WAL, so its commit waits for the flush.
# (An xid alone, `txid_current()`, commits without waiting.) Inside a
# transaction, or with synchronous_commit off, it flushes nothing and the
# reader polls FLUSHED as before.
# Its second column says whether the commit waits for the flush (any setting
# but `off` flushes locally): then no FLUSHED check is needed after it.
FORCE_FLUSH = (
    "SELECT pg_logical_emit_message(true, 'conveyor.flush', ''), current_setting('synchronous_commit') <> 'off'"
)
_FLUSH_POLL = 0.01
_FLUSH_PATIENCE = 10.0

log = logging.getLogger(__name__)


async def until_flushed(
    lsn: str,
    flushed: bool,
    check: Callable[[str], Awaitable[bool]],
    force: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Return once the WAL is flushed up to `lsn` (`flushed`: it already was);
    `check(lsn)` asks Postgres (FLUSHED); `force()` runs FORCE_FLUSH in
    autocommit and returns its second column. Errors of `check` propagate."""
    if not flushed and force is not None:
        try:
            flushed = await force()
        except Exception:  # noqa: BLE001 - a server that refuses it: poll as before
            log.warning("forcing a WAL flush failed; waiting for the walwriter instead", exc_info=True)
    deadline = time.monotonic() + _FLUSH_PATIENCE
    while not flushed:
        if time.monotonic() > deadline:
            log.warning("the WAL is not flushed up to %s after %.0f s; going on", lsn, _FLUSH_PATIENCE)
            return
        await asyncio.sleep(_FLUSH_POLL)
        flushed = await check(lsn)
