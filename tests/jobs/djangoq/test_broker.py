"""The Postgres broker against a real Postgres: ordering, SKIP LOCKED, delays,
redelivery, NOTIFY wake-ups and LISTEN reconnection."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone
from django_q.conf import Conf
from django_q.signing import SignedPackage

from jobs.djangoq import broker as broker_module
from jobs.djangoq.broker import PostgresBroker
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def enqueue(key: str, label: str, *, priority: int = 0, run_at=None) -> int:
    return broker_module.enqueue(label, queue=key, timeout=10, run_at=run_at, priority=priority)


def labels(rows) -> list[str]:
    return [SignedPackage.loads(payload)["args"][0] for _, payload in rows or []]


@pytest.fixture
def fast(monkeypatch):
    """Short timeouts, and every broker's LISTEN connection closed afterwards."""
    monkeypatch.setattr(Conf, "BULK", 10)
    monkeypatch.setattr(Conf, "RETRY", 1)
    monkeypatch.setattr(PostgresBroker, "FALLBACK_POLL", 0.05)
    made: list[PostgresBroker] = []
    original_init = PostgresBroker.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(PostgresBroker, "__init__", tracking_init)
    yield
    for broker in made:
        broker.close()


def test_it_claims_in_priority_then_fifo_order(fast):
    for label, priority in (("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)):
        enqueue("q", label, priority=priority)
    rows = PostgresBroker("q").dequeue()
    assert labels(rows) == ["b", "d", "a", "c", "e"]


def test_it_only_claims_rows_of_its_own_queue(fast):
    enqueue("other", "x")
    enqueue("q", "y")
    assert labels(PostgresBroker("q").dequeue()) == ["y"]


def test_a_claimed_row_is_invisible_until_its_visibility_timeout_then_redelivered(fast):
    enqueue("q", "a")
    broker = PostgresBroker("q")
    first = broker.dequeue()
    assert labels(first) == ["a"]
    assert broker.dequeue() is None
    assert broker.queue_size() == 0 and broker.lock_size() == 1
    again = wait_until(broker.dequeue, timeout=10, message="the row to be redelivered")
    assert [row[0] for row in again] == [row[0] for row in first]


def test_an_acknowledged_row_is_gone(fast):
    enqueue("q", "a")
    broker = PostgresBroker("q")
    (row,) = broker.dequeue()
    broker.acknowledge(row[0])
    time.sleep(1.1)  # past the 1 s visibility timeout, when an unacknowledged row comes back
    assert broker.dequeue() is None
    assert broker.queue_size() == 0 and broker.lock_size() == 0


def test_a_delayed_row_is_delivered_at_its_time_not_before(fast, monkeypatch):
    monkeypatch.setattr(PostgresBroker, "FALLBACK_POLL", 5.0)
    broker = PostgresBroker("q")
    enqueue("q", "later", run_at=timezone.now() + timedelta(seconds=0.6))
    assert broker._run("SELECT count(*) FROM django_q_ormq WHERE key = 'q' AND lock > now()", [])[0][0] == 1
    started = time.monotonic()
    rows = None
    while rows is None and time.monotonic() - started < 5:
        rows = broker.dequeue()
    waited = time.monotonic() - started
    assert labels(rows) == ["later"]
    # The broker slept until the row was due (not a 5 s fallback poll).
    assert 0.5 <= waited < 1.2


def test_competing_brokers_claim_disjoint_rows(fast):
    for i in range(300):
        enqueue("q", f"job-{i}")
    claimed: list[list[str]] = [[], [], [], []]

    def drain(slot: int) -> None:
        broker = PostgresBroker("q")
        try:
            for _ in range(200):
                rows = broker.dequeue()
                if rows:
                    claimed[slot].extend(labels(rows))
                    for row_id, _ in rows:
                        broker.acknowledge(row_id)
                elif broker.queue_size() == 0:
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = [label for part in claimed for label in part]
    assert sorted(everything) == sorted(f"job-{i}" for i in range(300))
    assert len(set(everything)) == 300
    assert sum(1 for part in claimed if part) >= 2


def _dequeue_in_thread(broker: PostgresBroker, out: dict) -> threading.Thread:
    def run():
        started = time.monotonic()
        try:
            rows = None
            while rows is None and time.monotonic() - started < 10:
                rows = broker.dequeue()
            out["rows"] = rows
            out["after"] = time.monotonic() - started
        finally:
            connections["default"].close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def listening_pid(broker: PostgresBroker) -> int | None:
    """The backend pid of the broker's LISTEN connection once its LISTEN has run."""
    listener = broker._listener
    if listener is None or listener.closed:
        return None
    pid = listener.info.backend_pid
    with connection.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return pid if row and row[0].startswith("LISTEN") else None


def test_an_idle_broker_wakes_on_notify_instead_of_polling(fast, monkeypatch):
    monkeypatch.setattr(PostgresBroker, "FALLBACK_POLL", 30.0)
    broker = PostgresBroker("q")
    out: dict = {}
    thread = _dequeue_in_thread(broker, out)
    # Listening, and the wake-up that follows LISTEN consumed: the broker waits.
    wait_until(lambda: listening_pid(broker) and not broker._wake.is_set(), timeout=10, message="LISTEN")
    enqueue("q", "wake")
    thread.join(timeout=10)
    assert labels(out["rows"]) == ["wake"]
    assert out["after"] < 2.0  # woken by NOTIFY, far before the 30 s fallback


def test_the_broker_listens_again_after_its_connection_is_cut(fast, monkeypatch):
    monkeypatch.setattr(PostgresBroker, "FALLBACK_POLL", 30.0)
    broker = PostgresBroker("q")
    broker._ensure_listener()
    pid = wait_until(lambda: listening_pid(broker), timeout=10, message="LISTEN")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    # The first wait notices the dead connection; the next dequeue reconnects.
    assert broker.dequeue() is None
    out: dict = {}
    thread = _dequeue_in_thread(broker, out)
    wait_until(lambda: listening_pid(broker) not in (None, pid), timeout=15, message="LISTEN on a new connection")
    enqueue("q", "after-cut")
    thread.join(timeout=15)
    assert labels(out["rows"]) == ["after-cut"]


def test_its_task_packages_are_what_django_q2_signs_and_reads():
    task = {"id": "abc", "name": "job:1", "func": broker_module._run_job(), "args": ("1",), "kwargs": {}, "timeout": 9}
    for _ in range(5):  # both signed within one second: they carry a timestamp
        second = int(time.time())
        ours, theirs = broker_module._sign(task), SignedPackage.dumps(task)
        if int(time.time()) == second:
            break
    assert ours == theirs
    assert SignedPackage.loads(ours) == task


def test_a_stopping_clusters_pusher_stops_without_waiting_out_its_poll(fast, monkeypatch):
    # Django-Q2's pusher sees its stop event only between two dequeues, and an
    # idle broker's dequeue waits up to FALLBACK_POLL: most of a stop's time.
    import multiprocessing

    from jobs.djangoq.cluster import waking_pusher

    monkeypatch.setattr(PostgresBroker, "FALLBACK_POLL", 30.0)
    broker = PostgresBroker("q")
    stop = multiprocessing.get_context("fork").Event()
    tasks = multiprocessing.get_context("fork").Queue()

    def push() -> None:
        try:
            waking_pusher(tasks, stop, broker)
        finally:
            connections["default"].close()

    pushing = threading.Thread(target=push, daemon=True)
    pushing.start()
    # The pusher idle in its broker's wait (listening, the first wake-up consumed).
    wait_until(lambda: listening_pid(broker) and not broker._wake.is_set(), timeout=10, message="an idle pusher")
    asked = time.monotonic()
    stop.set()
    pushing.join(timeout=10)
    assert not pushing.is_alive()
    assert time.monotonic() - asked < 5.0  # not the 30 s poll
    # Stopping, the broker still claims; with nothing to claim it returns at once.
    enqueue("q", "after-stop")
    assert labels(broker.dequeue()) == ["after-stop"]
    started = time.monotonic()
    assert broker.dequeue() is None
    assert time.monotonic() - started < 5.0
