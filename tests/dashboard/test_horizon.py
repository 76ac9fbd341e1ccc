"""The overview's warning of a long-open transaction (the xmin horizon): shown
on the page and live through its stream, with the query for staff only. A real
transaction held open on its own connection; the threshold lowered to 1 s."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from tests.conftest import held_transaction, wait_until
from tests.dashboard.conftest import SSEClient, running_hub, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)  # pg_stat_activity is read once per transaction

WARNING = "A transaction has been open for"


@pytest.fixture
def low_threshold(settings):
    settings.CONVEYOR_HORIZON_WARNING_SECONDS = 1


def _past_threshold():
    from dashboard.queries import horizon

    return wait_until(horizon, timeout=15, message="the held transaction to pass the threshold")


def test_the_overview_names_the_open_transaction_and_shows_its_query_to_staff_only(
    low_threshold, client, operator, reader
):
    client.force_login(operator)
    assert WARNING not in client.get("/").content.decode()

    with held_transaction("pinned-by-test") as pid:
        _past_threshold()
        staff = client.get("/").content.decode()
        client.force_login(reader)
        other = client.get("/").content.decode()

    for html in (staff, other):
        assert WARNING in html
        assert f'pid <span class="mono">{pid}</span>' in html
        assert "pinned-by-test" in html and "idle in transaction" in html
        assert "Postgres cannot remove dead rows while it is open, so claims slow down." in html
        assert f"pg_terminate_backend({pid})" in html
    assert "txid_current" in staff
    assert "txid_current" not in other and "query <code>" not in other
    assert WARNING not in client.get("/").content.decode()


def test_under_the_threshold_there_is_no_warning(client, reader, settings):
    settings.CONVEYOR_HORIZON_WARNING_SECONDS = 3600
    client.force_login(reader)
    with held_transaction():
        html = client.get("/").content.decode()
    assert 'id="horizon"' in html and WARNING not in html


@pytest.mark.anyio
async def test_the_overview_stream_brings_the_warning_and_takes_it_away(low_threshold, operator, reader):
    from dashboard.live.publisher import publish_queue_stats
    from jobs.models import JobEvent

    publish = sync_to_async(lambda: publish_queue_stats(min_interval=0))
    staff_cookie = await sync_to_async(session_cookie)(operator)
    reader_cookie = await sync_to_async(session_cookie)(reader)
    async with running_hub():
        staff = await SSEClient("/events/overview", cookie=staff_cookie).open()
        other = await SSEClient("/events/overview", cookie=reader_cookie).open()
        try:
            with held_transaction("pinned-by-test") as pid:
                await sync_to_async(_past_threshold)()
                await publish()
                (seen_by_staff,) = await staff.events(1, names={"horizon"})
                (seen_by_other,) = await other.events(1, names={"horizon"})
            for message in (seen_by_staff, seen_by_other):
                assert message["data"].startswith('<div id="horizon"')
                assert WARNING in message["data"] and f"pg_terminate_backend({pid})" in message["data"]
            assert "txid_current" in seen_by_staff["data"]
            assert "txid_current" not in seen_by_other["data"]
            # The event every viewer and API client receives never carries the query.
            latest = await JobEvent.objects.filter(type="queue.stats").alast()
            data = latest.data if isinstance(latest.data, dict) else json.loads(latest.data)
            assert data["horizon"]["pid"] == pid and "query" not in data["horizon"]

            await publish()  # closed: the warning goes
            for client in (staff, other):
                (gone,) = await client.events(1, names={"horizon"})
                assert gone["data"].startswith('<div id="horizon"') and WARNING not in gone["data"]
        finally:
            await staff.close()
            await other.close()
