"""Helpers of the operations tests: fake cluster heartbeats, parsed scrapes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone


def save_heartbeat(queue: str | None, *, workers: int = 2, age_seconds: float = 0, status: str = "Idle") -> None:
    """Store a Django-Q2 cluster heartbeat as a cluster serving `queue` would."""
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage
    from django_q.status import Stat, Status

    beat = Status(pid=4321, cluster_id=uuid.uuid4())
    beat.status = status
    beat.workers = list(range(1000, 1000 + workers))
    beat.timestamp = timezone.now() - timedelta(seconds=age_seconds)
    if queue is not None:
        beat.queue = queue
    # 60 s rather than Django-Q2's 3: the test may be slow, the beat must not expire.
    get_broker().set_stat(Stat.get_key(beat.cluster_id), SignedPackage.dumps(beat, True), 60)


@pytest.fixture
def heartbeat(db):
    """`heartbeat("default", workers=2)`; clears every stored heartbeat first and after."""
    from django.core.cache import cache

    cache.clear()
    yield save_heartbeat
    cache.clear()


@pytest.fixture
def anyio_backend():
    return "asyncio"
