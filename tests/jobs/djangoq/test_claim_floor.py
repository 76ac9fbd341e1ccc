"""Claims under a pinned xmin horizon (a transaction left open): the dead
versions of every row claimed so far stay in the broker table's indexes, and
a claim that scans from the start walks them all (bench/horizon.py measured
880 -> 212 jobs/s over a 50,000-job drain). A claim that took all it asked
for lets the next one start at its earliest row (`ClaimFloor`), and a row
below the floor is still claimed within FULL_EVERY."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django_q.conf import Conf
from django_q.signing import SignedPackage

from jobs.djangoq import broker as broker_module
from jobs.djangoq.broker import _CLAIM, ClaimFloor, PostgresBroker, claim_floor, floored
from tests.conftest import held_transaction

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = 2000


@pytest.fixture
def brokers(monkeypatch):
    monkeypatch.setattr(Conf, "BULK", 10)
    made: list[PostgresBroker] = []

    def make(key: str) -> PostgresBroker:
        made.append(PostgresBroker(key))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def _fill(key: str, n: int) -> None:
    """n ready rows of `key`, an hour old, 1 ms apart, with payloads of a task's size."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO django_q_ormq (key, payload, lock, priority)"
            " SELECT %s, repeat('x', 400), clock_timestamp() - interval '1 hour' + i * interval '1 ms', 0"
            " FROM generate_series(1, %s) i",
            [key, n],
        )
        cursor.execute("ANALYZE django_q_ormq")  # as autovacuum would have: the planner knows the table


def _pages_read(statement: str, params: list) -> int:
    """Shared buffers the claim's scan for ready rows touched (the scan of
    django_q_ormq by its own name, not the UPDATE's join as `o`), from
    EXPLAIN ANALYZE, rolled back."""
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params)
        plan = cursor.fetchone()[0]
        cursor.execute("ROLLBACK")
    plan = plan if isinstance(plan, list) else __import__("json").loads(plan)

    def scans(node: dict):
        if node.get("Alias") == "django_q_ormq":
            yield node["Shared Hit Blocks"] + node["Shared Read Blocks"]
        for child in node.get("Plans", ()):
            yield from scans(child)

    return sum(scans(plan[0]["Plan"]))


def test_under_a_pinned_horizon_a_floored_claim_skips_the_dead_rows_a_full_one_walks(brokers):
    broker = brokers("q")
    _fill("q", ROWS + 20)
    with held_transaction():
        taken = []
        while len(taken) < ROWS:
            rows = broker.dequeue()
            assert rows and len(rows) == Conf.BULK
            taken += [row_id for row_id, _ in rows]
            broker.acknowledge(rows[0][0])  # finished ones are deleted, the others re-armed: all dead versions
            for row_id, _ in rows[1:]:
                broker.acknowledge(row_id)
        floor = claim_floor("q", "broker").floor
        assert floor is not None
        statement, params = _CLAIM.format(limit=10), ["q", "q", "q", 60]
        full = _pages_read(statement, params)
        bounded = _pages_read(floored(statement), [*params[:3], floor, *params[3:]])
    assert full > 10 * bounded, (full, bounded)
    assert 0 < bounded < 20


def test_a_row_below_the_floor_is_claimed_within_full_every(brokers, monkeypatch):
    broker = brokers("q")
    _fill("q", 30)
    first = broker.dequeue()
    assert len(first) == Conf.BULK
    floor = claim_floor("q", "broker")
    assert floor.floor is not None
    # A row that became ready before the floor (an insert that committed late,
    # a claim rolled back): the floored claim does not see it...
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO django_q_ormq (key, payload, lock, priority) VALUES ('q', %s, %s, 0) RETURNING id",
            [broker_module.task_package("late", 10), floor.floor - timedelta(minutes=5)],
        )
        late = cursor.fetchone()[0]
    second = [row_id for row_id, _ in broker.dequeue()]
    assert late not in second
    # ...the next claim that scans from the start takes it first.
    monkeypatch.setattr(floor, "full_due", 0.0)
    third = broker.dequeue()
    assert third[0][0] == late
    assert SignedPackage.loads(third[0][1])["args"][0] == "late"


def test_a_claim_that_takes_fewer_than_it_asked_drops_the_floor():
    floor = ClaimFloor()
    assert floor.bound() is None
    from django.utils import timezone

    now = timezone.now()
    floor.claimed([now, now - timedelta(seconds=1)], asked=2)
    assert floor.bound() == now - timedelta(seconds=1)
    floor.claimed([now], asked=2)
    assert floor.bound() is None
