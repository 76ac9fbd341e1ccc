"""Workers' own writes commit without waiting for the WAL flush, on every
thread's connection, and the setting is sent once per connection."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.durability import relax_commit_durability

pytestmark = pytest.mark.django_db(transaction=True)


def _relaxed_here() -> tuple[str, int]:
    relax_commit_durability()
    with CaptureQueriesContext(connection) as again:
        relax_commit_durability()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        setting = cursor.fetchone()[0]
    return setting, len(again.captured_queries)


def test_it_relaxes_each_threads_connection_once():
    results: list[tuple[str, int]] = []

    def other_thread() -> None:
        try:
            results.append(_relaxed_here())
        finally:
            connection.close()

    assert _relaxed_here() == ("off", 0)
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(timeout=30)
    assert results == [("off", 0)]
    # The other thread's connection did not evict this one's.
    with CaptureQueriesContext(connection) as after:
        relax_commit_durability()
    assert after.captured_queries == []
