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
for. No data is corrupted and no job is lost.
"""

from __future__ import annotations

import threading

from django.db import connection

# thread -> id of the raw connection already relaxed. Django's connections are
# per thread, and a worker has several (its main thread, the lane's database
# thread): one slot per thread, so they don't evict each other and re-send the
# SET on every call.
_relaxed: dict[int, int] = {}


def relax_commit_durability() -> None:
    """Turn off the commit flush wait for this thread's Django connection."""
    connection.ensure_connection()
    raw = id(connection.connection)
    thread = threading.get_ident()
    if _relaxed.get(thread) == raw:
        return
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    _relaxed[thread] = raw  # a reconnect replaces the old connection (and its id)
