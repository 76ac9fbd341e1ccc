"""Everything Django-Q2 sees: the broker rows that make workers run jobs, and
the Postgres-native broker class that hands them out.

Django-Q2 is transport; the Job row is the truth. A broker row only says
"look at job X": the runner decides what that means. Rows are written with the
Django connection, so they commit (or roll back) with the job change that
caused them.

Rows live in Django-Q2's own table (`django_q_ormq`, so its admin and
`qinfo`/`qmonitor` keep working) with two added columns: `priority`, and
`job_id`, the job the task names (for the lane's direct claims). A row is
invisible until its `lock` time: that is both the visibility timeout of a
delivered row and the earliest-run time of a retry or a scheduled job.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import pickle
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import cache
from uuid import UUID, uuid4

import psycopg
from django.conf import settings
from django.core.signing import b62_encode
from django.db import DatabaseError, connection
from django.utils import timezone
from django_q.brokers import Broker
from django_q.conf import Conf
from django_q.signing import SignedPackage

from config.server.patching import guarded
from jobs.db import sql
from jobs.db.durability import relax_commit_durability

log = logging.getLogger(__name__)

CHANNEL = "conveyor_broker"

# The row and its wake-up call in one round trip; NOTIFY is delivered at
# commit, so a worker never wakes for a row it cannot see yet.
_INSERT = f"""
WITH r AS (
    INSERT INTO django_q_ormq (key, payload, lock, priority, job_id) VALUES (%s, %s, %s, %s, %s) RETURNING id
)
SELECT id, pg_notify('{CHANNEL}', %s) FROM r
"""

# Claim a batch: visible rows of this cluster's queue, best priority first,
# then in the order they became visible. SKIP LOCKED lets competing clusters
# take disjoint batches instead of queueing on each other's row locks.
# The limit is written into the text, not bound: a prepared statement's
# generic plan assumes a parameter LIMIT returns 100 rows and joins the
# claimed rows back to the table by a sequential scan; planning a custom plan
# instead, every time, cost more than running the claim.
#
# The queue's operator controls (jobs_queuecontrol, see jobs/engine/queues.py):
# nothing is delivered while it is paused, and no more rows than it has room
# for while its running jobs are limited (the job's claim takes the place; this
# only spares deliveries that would be refused). A queue without a control row
# costs one primary-key probe.
_CLAIM = """
WITH qc AS (
    SELECT paused, max_running FROM jobs_queuecontrol WHERE name = %s
), room AS (
    SELECT max_running - (SELECT count(*) FROM jobs_job WHERE queue = %s AND state = 'running'
                          AND lease_expires_at > now()) AS n
    FROM qc WHERE max_running IS NOT NULL
), picked AS (
    SELECT id, priority, lock FROM django_q_ormq
    WHERE key = %s AND lock <= now() AND NOT EXISTS (SELECT 1 FROM qc WHERE paused)
    ORDER BY priority DESC, lock, id
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, priority, lock, row_number() OVER (ORDER BY priority DESC, lock, id) AS rank FROM picked
), claimed AS (
    UPDATE django_q_ormq o SET lock = now() + make_interval(secs => %s)
    FROM ranked picked WHERE o.id = picked.id AND picked.rank <= coalesce((SELECT n FROM room), {limit})
    RETURNING o.id, o.payload, picked.priority, picked.lock AS ready_at
)
SELECT id, payload, ready_at FROM claimed ORDER BY priority DESC, ready_at, id
"""

# The claim's scan, bounded below by a ClaimFloor.
_UNBOUNDED = "lock <= now()"
_FLOORED = "lock >= %s AND lock <= now()"


def floored(statement: str) -> str:
    """`statement` (a claim whose scan of django_q_ormq says `lock <= now()`)
    with its scan starting at a ClaimFloor: one more parameter, after the key."""
    assert statement.count(_UNBOUNDED) == 1, statement
    return statement.replace(_UNBOUNDED, _FLOORED)


class ClaimFloor:
    """Where a process's claims of one key may start scanning the broker rows.

    Claims take ready rows in (priority, lock, id) order, and every row they
    take is re-armed later or deleted, which leaves its old version in the
    table and in both indexes until VACUUM removes it. VACUUM can remove none
    while any transaction older than them is open (a session idle in
    transaction pins the xmin horizon), and then every claim walks, and visits
    in the heap, the dead entries of every row claimed so far: draining a
    backlog of N jobs costs O(N²). So after a claim that took all it asked
    for, the next one starts at the earliest `lock` it took: everything before
    that was taken already (or is being taken by a concurrent claim).

    A row can still turn up below the floor: a claim that took it rolled back,
    or an insert committed late with an earlier `lock`. So the floor is
    dropped, and the next claim scans from the start, after a claim that took
    fewer rows than it asked for (the queue may be drained up to the floor),
    and at least every FULL_EVERY seconds: such a row waits at most that long.
    The same bound holds for order across priorities: once the rows of one
    priority are all taken, the floor is left by the claim that takes fewer,
    but a lower-priority row older than the floor can wait up to FULL_EVERY
    behind newer ones of its priority.
    """

    FULL_EVERY = 1.0

    def __init__(self) -> None:
        self.floor: datetime | None = None
        self.full_due = 0.0

    def bound(self) -> datetime | None:
        """The floor for the next claim; None: scan from the start."""
        if self.floor is None or time.monotonic() >= self.full_due:
            self.floor = None
            self.full_due = time.monotonic() + self.FULL_EVERY
        return self.floor

    def claimed(self, ready_at: list[datetime], *, asked: int) -> None:
        """After a claim: the `lock` of each row it took, before the claim."""
        self.floor = min(ready_at) if ready_at and len(ready_at) >= asked else None


_floors: dict[tuple[str, str], ClaimFloor] = {}


def claim_floor(key: str, scope: str) -> ClaimFloor:
    """This process's floor for the claims of `key` by `scope`: "broker" (its
    deliveries, any row) or "ready" (chains and lane fills, rows with a job)."""
    floor = _floors.get((key, scope))
    if floor is None:
        floor = _floors[key, scope] = ClaimFloor()
    return floor


_NEXT_DUE = "SELECT extract(epoch FROM min(lock) - now()) FROM django_q_ormq WHERE key = %s AND lock > now()"


# What every broker row runs, `jobs.worker.runner.run_job`, set by
# `JobsConfig.ready()`: the broker sits below the worker, so it is told rather
# than importing it. Pickled by reference, as before.
task_function: Callable[[str], None] | None = None


def _run_job() -> Callable[[str], None]:
    if task_function is None:
        raise RuntimeError("the broker has no task function: JobsConfig.ready() sets it")
    return task_function


def cluster_for_queue(queue: str) -> str:
    """The Django-Q2 cluster (broker list key) that serves `queue`."""
    return queue


def enqueue(job_id: UUID | str, *, queue: str, timeout: int, run_at: datetime | None = None, priority: int = 0) -> int:
    """Insert a broker row asking a worker of `queue`'s cluster to look at the job
    at `run_at` (now when None). Call inside the transaction of the job change."""
    now = timezone.now()
    key = cluster_for_queue(queue)
    return sql.fetchone(
        _INSERT, [key, task_package(job_id, timeout), max(run_at or now, now), priority, _job_column(job_id), key]
    )[0]


def _job_column(job_id: UUID | str) -> str | None:
    # The runner ignores a task naming a malformed id; the row can name no job.
    try:
        return str(UUID(str(job_id)))
    except ValueError:
        return None


def ctes() -> str:
    """SQL that inserts the broker row (and its wake-up) for the job row an
    earlier CTE named `j` returned, to splice into a `WITH j AS (...)`
    statement. Parameters: `cte_params(...)`."""
    return (
        ", b AS (INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
        " SELECT %s, %s, greatest(coalesce(j.run_after, now()), now()), j.priority, j.id FROM j RETURNING id)"
        f", bn AS (SELECT pg_notify('{CHANNEL}', %s) FROM b)"
    )


def cte_params(job_id: UUID | str, *, queue: str, timeout: int) -> list:
    key = cluster_for_queue(queue)
    return [key, task_package(job_id, timeout), key]


def delay_row(row_id: int, seconds: float) -> None:
    """Make a delivered row visible again in `seconds` (a claim its queue refused)."""
    sql.fetchone(
        "WITH d AS (UPDATE django_q_ormq SET lock = now() + make_interval(secs => %s) WHERE id = %s RETURNING 1)"
        " SELECT count(*) FROM d",
        [seconds, row_id],
    )


def delete_rows(ids: list[int]) -> None:
    if ids:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM django_q_ormq WHERE id = ANY(%s)", [ids])


def replace_broken_connection() -> None:
    """Close this thread's Django connection if a query found it broken (for
    instance Postgres restarted), so the next query opens a new one. A
    process's long-lived threads need this: Django only does it around
    requests. Costs nothing unless a query failed; never inside a transaction."""
    if connection.connection is None or connection.in_atomic_block or not connection.errors_occurred:
        return
    if connection.is_usable():
        connection.errors_occurred = False
    else:
        connection.close()


# What Django's get_connection_params() adds for its own cursors and
# adapters: a LISTEN connection uses psycopg's (and may be async).
_DJANGO_ONLY_PARAMS = ("cursor_factory", "context", "prepare_threshold")


def listen_params(application_name: str) -> dict[str, str]:
    """Connection parameters of a LISTEN connection (the broker's, the event
    hub's): Django's own, DATABASES OPTIONS included (sslmode, certificates,
    `options`, ...), so it reaches the server as Django does. The name and
    TCP keepalives (a half-open connection would otherwise wait forever for
    notifications; ignored on Unix sockets) are defaults OPTIONS may override."""
    params = {
        "application_name": application_name,
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
    }
    for name, value in {**connection.get_connection_params(), **_direct_params()}.items():
        if name not in _DJANGO_ONLY_PARAMS and value not in (None, ""):
            params[name] = str(value)
    return params


_DIRECT_KEYS = {"HOST": "host", "PORT": "port", "USER": "user", "PASSWORD": "password", "NAME": "dbname"}


def _direct_params() -> dict[str, object]:
    """Behind a transaction pooler (settings.DATABASE_DIRECT_URL set), where
    a LISTEN would be lost with the server connection the pooler hands back
    after each transaction: where the direct URL reaches Postgres, and its
    OPTIONS. Nothing otherwise."""
    direct = getattr(settings, "DATABASE_DIRECT", None)
    if not direct:
        return {}
    # All five replace the pooled URL's, an empty one too (a password the
    # direct URL does not give is not sent).
    return {**direct.get("OPTIONS", {}), **{param: direct.get(key) for key, param in _DIRECT_KEYS.items()}}


def task_package(job_id: UUID | str, timeout: int) -> str:
    """The signed Django-Q2 task that runs `jobs.worker.runner.run_job(job_id)`."""
    return _sign(
        {
            "id": uuid4().hex,
            "name": f"job:{job_id}",
            # The function itself (pickled by reference) rather than its dotted
            # name: the worker then skips a pydoc.locate() per task.
            "func": _run_job(),
            "args": (str(job_id),),
            "kwargs": {},
            "started": timezone.now(),
            # Django-Q2 kills a worker that runs past this; leave the runner
            # room to record the outcome first.
            "timeout": timeout + 30,
        }
    )


def _sign(task: dict) -> str:
    """What `SignedPackage.dumps(task)` returns (uncompressed, as Django-Q2's
    default `compress: False`), faster: Django's signer derives its HMAC key
    from the secret on every call and goes through a dozen helpers, which
    made signing the bulk of a large batch's CPU.
    tests/jobs/djangoq/test_broker.py holds it equal to Django-Q2's output.
    Written for Django-Q2 1.11.1's format and Django 5.2.19's signer; on other
    versions Django-Q2 signs (config/server/patching.py)."""
    if not guarded(SIGNING_PATCH, package="django-q2", versions=("1.11.1",), also=_SIGNING_ALSO, install=_nothing):
        return SignedPackage.dumps(task)
    value = base64.urlsafe_b64encode(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)).rstrip(b"=")
    value += b":" + b62_encode(int(time.time())).encode()
    signature = base64.urlsafe_b64encode(hmac.new(_signing_key(), value, hashlib.sha256).digest()).rstrip(b"=")
    return (value + b":" + signature).decode()


SIGNING_PATCH = "django-q2-signed-task"
_SIGNING_ALSO = {"Django": ("5.2.19",)}


def _nothing() -> None:
    pass


@cache
def _signing_key() -> bytes:
    # django.utils.crypto.salted_hmac(salt + "signer", …, secret, "sha256"),
    # as django.core.signing.Signer.signature computes it.
    return hashlib.sha256(f"{Conf.PREFIX}signer{Conf.SECRET_KEY}".encode()).digest()


class PostgresBroker(Broker):
    """A Django-Q2 broker for Postgres (`Q_CLUSTER["broker_class"]`).

    - claims a batch of ready rows in one statement with FOR UPDATE SKIP LOCKED,
      in priority then FIFO order;
    - sleeps on LISTEN until a row is enqueued or the next delayed row comes
      due (with a slow fallback poll), instead of polling every 0.2 s;
    - keeps Django-Q2's semantics: a claimed row stays invisible for `retry`
      seconds and is redelivered unless acknowledged.
    """

    # Idle clusters look once a second anyway: it bounds how long a missed
    # notification waits. (A stop does not wait for it: `stop_waiting`.)
    FALLBACK_POLL = 1.0

    def __init__(self, list_key: str | None = None) -> None:
        super().__init__(list_key)
        self._init_listener()

    def get_connection(self, list_key: str | None = None):
        return connection

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._init_listener()

    def _init_listener(self) -> None:
        self._listener: psycopg.Connection | None = None
        self._listener_thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._stopping = False

    # --- Django-Q2's broker interface ---------------------------------------

    def enqueue(self, task: str) -> int:
        return sql.fetchone(_INSERT, [self.list_key, task, timezone.now(), 0, self.list_key])[0]

    def dequeue(self):
        self._ensure_listener()
        # Cleared before the claim: a row that arrives while it runs sets it
        # again, and the wait below returns at once.
        self._wake.clear()
        try:
            relax_commit_durability()
            limit = int(Conf.BULK)
            floor = claim_floor(self.list_key, "broker")
            bound = floor.bound()
            statement, params = _CLAIM.format(limit=limit), [self.list_key, self.list_key, self.list_key, Conf.RETRY]
            if bound is not None:
                statement, params = floored(statement), [*params[:3], bound, *params[3:]]
            rows = self._run(statement, params)
            floor.claimed([row[2] for row in rows], asked=limit)
        except DatabaseError as exc:
            # Postgres restarting: Django-Q2's pusher would log, sleep 10 s and
            # die on an exception; returning nothing keeps it polling instead.
            log.warning("broker: cannot claim rows (%s); trying again in %.1f s", exc, self.FALLBACK_POLL)
            self._closed.wait(self.FALLBACK_POLL)
            return None
        if rows:
            return [(row[0], row[1]) for row in rows]
        self._wait()
        return None

    def acknowledge(self, task_id) -> None:
        try:
            relax_commit_durability()
            self._run("DELETE FROM django_q_ormq WHERE id = %s", [task_id], fetch=False)
        except DatabaseError as exc:
            # The row is delivered again after its visibility timeout, and the
            # runner treats that as a duplicate; raising would only kill
            # Django-Q2's monitor process.
            log.warning("broker: cannot acknowledge row %s (%s); it will be delivered again", task_id, exc)

    def fail(self, task_id) -> None:
        self.acknowledge(task_id)

    def delete(self, task_id) -> None:
        self.acknowledge(task_id)

    def queue_size(self) -> int:
        return self._run("SELECT count(*) FROM django_q_ormq WHERE key = %s AND lock <= now()", [self.list_key])[0][0]

    def lock_size(self) -> int:
        return self._run("SELECT count(*) FROM django_q_ormq WHERE key = %s AND lock > now()", [self.list_key])[0][0]

    def purge_queue(self):
        return self._run("DELETE FROM django_q_ormq WHERE key = %s", [self.list_key], fetch=False)

    def delete_queue(self):
        return self.purge_queue()

    def set_stat(self, key: str, value: str, timeout: int) -> None:
        # The sentinel saves its heartbeat here every half second (through the
        # database cache) and nothing else in that process replaces a
        # connection that a Postgres restart broke.
        replace_broken_connection()
        super().set_stat(key, value, timeout)

    def ping(self) -> bool:
        return self._run("SELECT 1", [])[0][0] == 1

    def info(self) -> str:
        return "Postgres (SKIP LOCKED claims, LISTEN/NOTIFY wake-ups)"

    def stop_waiting(self) -> None:
        """The cluster is stopping: a `dequeue` waiting for rows returns now,
        and later ones do not wait (the pusher then sees its stop event at once,
        instead of after up to FALLBACK_POLL; jobs.djangoq.cluster calls this)."""
        self._stopping = True
        self._wake.set()

    def close(self) -> None:
        """Stop listening (the Django connection is Django's)."""
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        if self._listener_thread is not None:
            self._listener_thread.join(timeout=5)
            self._listener_thread = None

    # --- internals ----------------------------------------------------------

    def _run(self, statement: str, params: list, *, fetch: bool = True):
        try:
            with sql.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall() if fetch else cursor.rowcount
        except DatabaseError:
            # A dead connection (Postgres restarted): drop it so the next call
            # reconnects; Django-Q2's pusher logs this and carries on.
            connection.close()
            raise

    def _ensure_listener(self) -> None:
        """Start the thread that holds this process's LISTEN connection."""
        if self._listener_thread is None or not self._listener_thread.is_alive():
            self._closed.clear()
            self._listener_thread = threading.Thread(target=self._listen, name="conveyor-broker-listen", daemon=True)
            self._listener_thread.start()

    def _listen(self) -> None:
        """Read notifications as they come, on a thread of their own: a LISTEN
        connection whose client stops reading makes its Postgres backend block
        on the socket, and a blocked backend holds up server-wide operations
        (CREATE/DROP DATABASE wait for every backend). Reconnects with backoff."""
        backoff = 0.5
        while not self._closed.is_set():
            try:
                self._listener = psycopg.connect(**listen_params(f"conveyor-broker-{self.list_key}"), autocommit=True)
                if self._closed.is_set():
                    return
                self._listener.execute(f"LISTEN {CHANNEL}")
                backoff = 0.5
                self._wake.set()  # rows may have arrived while not listening
                for notify in self._listener.notifies():
                    if notify.payload == self.list_key:
                        self._wake.set()
            except psycopg.Error as exc:
                if self._closed.is_set():
                    return
                log.warning("broker LISTEN connection lost (%s); reconnecting in %.1f s", exc, backoff)
            finally:
                if self._listener is not None:
                    self._listener.close()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _wait(self) -> None:
        """Sleep until this queue gets a row, the next delayed row is due, or
        the fallback poll interval passes; not at all once stopping."""
        if self._stopping:
            return
        timeout = self.FALLBACK_POLL
        try:
            due = self._run(_NEXT_DUE, [self.list_key])[0][0]
            if due is not None:
                timeout = max(0.0, min(timeout, float(due)))
        except DatabaseError:
            pass
        self._wake.wait(timeout)
