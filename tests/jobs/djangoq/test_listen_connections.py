"""The LISTEN connections (the broker's and the event hub's) connect with
the parameters Django's connection has, DATABASES OPTIONS included (sslmode,
certificates, keepalives, `options`, `application_name`)."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from jobs.djangoq.broker import PostgresBroker
from tests.conftest import wait_until
from tests.dashboard.conftest import running_hub, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

PROBE = "conveyor-options-probe"


@pytest.fixture
def options(monkeypatch) -> dict:
    """OPTIONS a deployment might set, read by every connection opened after this."""
    opts = connection.settings_dict["OPTIONS"]
    monkeypatch.setitem(opts, "application_name", PROBE)
    monkeypatch.setitem(opts, "keepalives_idle", "17")
    monkeypatch.setitem(opts, "options", "-c lock_timeout=4321")
    return opts


def _application_name(pid: int) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row[0] if row else None


def test_the_brokers_listen_connection_has_the_database_options(options):
    broker = PostgresBroker("default")
    try:
        broker._ensure_listener()
        listener = wait_until(
            lambda: broker._listener if broker._listener is not None and not broker._listener.closed else None,
            timeout=10,
            message="the broker's LISTEN connection",
        )
        assert _application_name(listener.info.backend_pid) == PROBE
        sent = listener.info.get_parameters()
        assert (sent.get("keepalives_idle"), sent.get("options")) == ("17", "-c lock_timeout=4321")
    finally:
        broker.close()


@pytest.mark.anyio
async def test_the_event_hubs_listen_connection_has_the_database_options(options):
    def now():
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            return cursor.fetchone()[0]

    def sessions_since(started) -> list[str]:
        # The hub's session: every other one opened since it started.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_start >= %s AND pid <> pg_backend_pid()",
                [started],
            )
            return [row[0] for row in cursor.fetchall()]

    started = await sync_to_async(now)()
    async with running_hub() as hub:
        hub.start()
        await wait_for(lambda: hub.connects == 1, timeout=10, message="the hub to listen")
        assert await sync_to_async(sessions_since)(started) == [PROBE]
