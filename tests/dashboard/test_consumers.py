"""The SSE endpoints end to end inside one process: routing, framing, replay,
fan-out through the hub's single LISTEN connection, slow subscribers,
reconnection. Real Postgres; the hub's notifications are real."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from tests.dashboard.conftest import SSEClient, running_hub, session_cookie, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


# --- sync helpers, called through sync_to_async ---------------------------------


def _submit(kind: str = "demo.noop", payload: dict | None = None, **options):
    from jobs.services import submit_job

    return submit_job(kind, payload or {}, **options).job


def _record(job, type: str, data: dict | None = None) -> int:
    from jobs.db import events

    return events.record(job.id, type, data or {}, queue=job.queue)


def _progress(job, percent: int, message: str = ""):
    from jobs.db import events
    from jobs.models import Job

    Job.objects.filter(id=job.id).update(progress_percent=percent, progress_message=message)
    return events.record(job.id, "job.progress", {"percent": percent, "message": message}, queue=job.queue)


def _start(job):
    from django.db import transaction
    from django.utils import timezone

    from jobs.engine.states import Sql, transition
    from jobs.models import Attempt, State

    with transaction.atomic():
        running = transition(
            job.id, target=State.RUNNING, event="job.started", attempts=Sql("attempts + 1"), started_at=Sql("now()")
        )
        Attempt.objects.create(job=running, number=running.attempts, worker="test:1", started_at=timezone.now())
    return running


def _finish(job, state: str, **fields):
    from django.db import transaction
    from django.utils import timezone

    from jobs.engine.states import Sql, transition
    from jobs.models import Attempt, State

    with transaction.atomic():
        done = transition(job.id, target=State(state), finished_at=Sql("now()"), **fields)
        Attempt.objects.filter(job_id=job.id, finished_at__isnull=True).update(
            finished_at=timezone.now(), outcome="succeeded" if state == "succeeded" else "failed"
        )
    return done


def _terminate_hub_sessions() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'conveyor-event-hub' AND datname = current_database()"
        )
        return cursor.fetchone()[0]


def _last_event_id() -> int:
    from dashboard.queries import latest_event_id

    return latest_event_id()


def _cookie(user) -> bytes:
    return session_cookie(user)


submit = sync_to_async(_submit)
record = sync_to_async(_record)
progress = sync_to_async(_progress)
start = sync_to_async(_start)
finish = sync_to_async(_finish)
last_event_id = sync_to_async(_last_event_id)
terminate_hub_sessions = sync_to_async(_terminate_hub_sessions)
cookie_for = sync_to_async(_cookie)


# --- framing ------------------------------------------------------------------------


def test_a_message_is_framed_with_its_id_name_and_one_data_line_per_line():
    from dashboard.live.sse import Message

    framed = Message("job-summary-1", "<p>a</p>\n<p>b</p>\r\n<p>c</p>", 42).encode()
    assert framed == b"id: 42\nevent: job-summary-1\ndata: <p>a</p>\ndata: <p>b</p>\ndata: <p>c</p>\n\n"


def test_compacting_keeps_the_last_of_each_replaced_fragment_and_every_appended_one():
    from dashboard.live.sse import Message, compact

    messages = [
        Message("summary", "1", 1),
        Message("timeline", "a", 1, mode="append"),
        Message("summary", "2", 2),
        Message("timeline", "b", 2, mode="append"),
    ]
    assert [(m.event, m.data, m.id) for m in compact(messages)] == [
        ("timeline", "a", 1),
        ("summary", "2", 2),
        ("timeline", "b", 2),
    ]


async def test_the_api_stream_is_an_event_stream_of_named_events_with_ids(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    async with running_hub():
        client = await SSEClient(f"/api/v1/events?job={job.id}", cookie=cookie).open()
        try:
            assert client.status == 200
            assert client.headers[b"content-type"].startswith(b"text/event-stream")
            assert client.headers[b"cache-control"] == b"no-cache"
            (created,) = await client.events(1)
            assert client.raw.startswith(b"retry: 2000\n\n")
            assert created["event"] == "job.created"
            body = json.loads(created["data"])
            assert created["id"] == body["id"]
            assert body["job"] == str(job.id) and body["queue"] == "default"
            assert body["job_state"]["state"] == "queued"

            progress_id = await progress(job, 40, "step 4 of 10")
            (live,) = await client.events(1)
            assert (live["event"], live["id"]) == ("job.progress", progress_id)
            assert json.loads(live["data"])["data"] == {"percent": 40, "message": "step 4 of 10"}
        finally:
            await client.close()


# --- replay ---------------------------------------------------------------------------


async def test_a_reconnecting_client_gets_what_it_missed_from_last_event_id_then_live(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    first = await progress(job, 10)
    missed = [await progress(job, 20), await progress(job, 30)]
    async with running_hub():
        client = await SSEClient(
            f"/api/v1/events?job={job.id}", cookie=cookie, headers=[(b"last-event-id", str(first).encode())]
        ).open()
        try:
            replayed = await client.events(2)
            assert [m["id"] for m in replayed] == missed
            new = await progress(job, 40)
            (live,) = await client.events(1)
            assert live["id"] == new
            assert await client.nothing_more()
        finally:
            await client.close()


async def test_the_cursor_may_come_as_after_and_last_event_id_wins(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    ids = [await progress(job, p) for p in (10, 20, 30)]
    async with running_hub():
        by_query = await SSEClient(f"/api/v1/events?job={job.id}&after={ids[0]}", cookie=cookie).open()
        both = await SSEClient(
            f"/api/v1/events?job={job.id}&after={ids[0]}",
            cookie=cookie,
            headers=[(b"last-event-id", str(ids[1]).encode())],
        ).open()
        try:
            assert [m["id"] for m in await by_query.events(2)] == ids[1:]
            assert [m["id"] for m in await both.events(1)] == ids[2:]
            assert await both.nothing_more()
        finally:
            await by_query.close()
            await both.close()


async def test_a_stream_without_cursor_starts_now_after_a_statistics_snapshot(operator):
    from dashboard.live.publisher import publish_queue_stats

    cookie = await cookie_for(operator)
    job = await submit()
    await progress(job, 50)
    await sync_to_async(publish_queue_stats)()
    async with running_hub() as hub:
        client = await SSEClient("/api/v1/events", cookie=cookie).open()
        try:
            (snapshot,) = await client.events(1)
            assert snapshot["event"] == "queue.stats"
            assert snapshot["id"] == hub.last_id  # "now": nothing older is replayed
            assert json.loads(snapshot["data"])["data"]["queues"][0]["queue"] == "default"
            new = await progress(job, 60)
            (live,) = await client.events(1)
            assert (live["event"], live["id"]) == ("job.progress", new)
        finally:
            await client.close()


async def test_the_api_stream_filters_by_queue(operator):
    cookie = await cookie_for(operator)
    mine = await submit(queue="llm")
    other = await submit(queue="default")
    async with running_hub():
        client = await SSEClient("/api/v1/events?queue=llm", cookie=cookie).open()
        try:
            await progress(other, 10)
            wanted = await progress(mine, 10)
            (live,) = await client.events(1)
            assert live["id"] == wanted
        finally:
            await client.close()


# --- fan-out --------------------------------------------------------------------------


async def test_many_subscribers_get_every_event_from_one_database_read_per_event(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    cursor = await last_event_id()
    async with running_hub() as hub:
        clients = [
            await SSEClient(f"/events/jobs/{job.id}?after={cursor}", cookie=cookie).open() for _ in range(25)
        ] + [await SSEClient(f"/api/v1/events?job={job.id}&after={cursor}", cookie=cookie).open() for _ in range(25)]
        try:
            reads_before = hub.reads
            ids = [await progress(job, percent) for percent in (20, 40, 60, 80, 100)]
            for client in clients[:25]:
                timeline = await client.events(5, names={f"job-timeline-{job.id}"})
                assert [m["id"] for m in timeline] == ids
            for client in clients[25:]:
                assert [m["id"] for m in await client.events(5)] == ids
            assert 1 <= hub.reads - reads_before <= len(ids)
            assert hub.shared.count == 0  # progress needs nothing beyond the event and its job
        finally:
            for client in clients:
                await client.close()


async def test_a_state_change_adds_one_shared_read_whatever_the_number_of_viewers(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    cursor = await last_event_id()
    async with running_hub() as hub:
        clients = [await SSEClient(f"/events/jobs/{job.id}?after={cursor}", cookie=cookie).open() for _ in range(10)]
        try:
            await start(job)
            for client in clients:
                (attempts,) = await client.events(1, names={f"job-attempts-{job.id}"})
                assert "test:1" in attempts["data"]
            assert hub.shared.count == 1
        finally:
            for client in clients:
                await client.close()


async def test_api_streams_share_one_rendering_of_each_event(operator, monkeypatch):
    from dashboard import streams

    cookie = await cookie_for(operator)
    job = await submit()
    rendered = []
    original = streams.api_event

    def counting_api_event(update, **options):
        rendered.append(update.id)
        return original(update, **options)

    monkeypatch.setattr(streams, "api_event", counting_api_event)
    async with running_hub():
        clients = [await SSEClient(f"/api/v1/events?job={job.id}", cookie=cookie).open() for _ in range(10)]
        try:
            for client in clients:  # each replays the job's log (its job.created) first, rendered per stream
                assert [m["event"] for m in await client.events(1)] == ["job.created"]
            rendered.clear()
            ids = [await progress(job, percent) for percent in (30, 60, 90)]
            for client in clients:
                assert [m["id"] for m in await client.events(3)] == ids
            assert sorted(rendered) == ids  # once per event, not once per event and stream
        finally:
            for client in clients:
                await client.close()


async def test_a_job_scoped_stream_is_never_asked_about_other_jobs_events(operator, monkeypatch):
    from dashboard import streams

    cookie = await cookie_for(operator)
    watched, busy = await submit(), await submit()
    cursor = await last_event_id()
    asked = []
    original = streams.ApiStream.wants

    def recording_wants(self, update):
        asked.append((self.job_id, update.event.job_id))
        return original(self, update)

    monkeypatch.setattr(streams.ApiStream, "wants", recording_wants)
    async with running_hub() as hub:
        watchers = [
            await SSEClient(f"/api/v1/events?job={watched.id}&after={cursor}", cookie=cookie).open() for _ in range(5)
        ]
        everything = await SSEClient(f"/api/v1/events?after={cursor}", cookie=cookie).open()
        try:
            await wait_for(lambda: len(hub.subscriptions) == 6)
            busy_ids = [await progress(busy, percent) for percent in (10, 20, 30)]
            watched_id = await progress(watched, 50)
            assert [m["id"] for m in await everything.events(4)] == [*busy_ids, watched_id]
            for watcher in watchers:
                assert [m["id"] for m in await watcher.events(1)] == [watched_id]
            assert not [pair for pair in asked if pair[0] == watched.id and pair[1] != watched.id]
            assert (watched.id, watched.id) in asked
        finally:
            for client in [*watchers, everything]:
                await client.close()


# --- dashboard fragments ---------------------------------------------------------------


async def test_the_job_stream_sends_the_fragments_its_page_swaps(operator):
    cookie = await cookie_for(operator)
    job = await submit("demo.sleep", {"seconds": 1})
    cursor = await last_event_id()
    async with running_hub():
        client = await SSEClient(f"/events/jobs/{job.id}?after={cursor}", cookie=cookie).open()
        try:
            await start(job)
            await progress(job, 40, "step 4 of 10")
            names = {f"job-summary-{job.id}", f"job-timeline-{job.id}"}
            messages = await client.events(4, names=names)
            summary = [m for m in messages if m["event"] == f"job-summary-{job.id}"][-1]
            assert 'sse-swap="job-summary-' in summary["data"]
            assert 'style="width: 40%"' in summary["data"] and "step 4 of 10" in summary["data"]
            assert "Cancel</button>" in summary["data"]  # an operator may cancel a running job

            await finish(job, "succeeded", result={"slept": 1}, progress_percent=100)
            outcome = await client.events(1, names={f"job-outcome-{job.id}"})
            assert "slept" in outcome[0]["data"]
        finally:
            await client.close()


async def test_a_reader_sees_no_buttons(reader):
    cookie = await cookie_for(reader)
    job = await submit()
    cursor = await last_event_id()
    async with running_hub():
        client = await SSEClient(f"/events/jobs/{job.id}?after={cursor}", cookie=cookie).open()
        try:
            await progress(job, 10)
            (summary,) = await client.events(1, names={f"job-summary-{job.id}"})
            assert "<button" not in summary["data"]
        finally:
            await client.close()


async def test_the_jobs_list_stream_updates_its_rows_and_counts_new_jobs(operator):
    cookie = await cookie_for(operator)
    shown = await submit()
    cursor = await last_event_id()
    async with running_hub():
        client = await SSEClient(f"/events/jobs?after={cursor}&ids={shown.id}", cookie=cookie).open()
        try:
            await progress(shown, 70)
            (row,) = await client.events(1, names={f"job-{shown.id}"})
            assert row["data"].startswith(f'<tr id="job-{shown.id}"') and "70%" in row["data"]
            await submit()
            (notice,) = await client.events(1, names={"jobs-new"})
            assert "1 new job" in notice["data"]
        finally:
            await client.close()


async def test_the_overview_stream_sends_cards_chart_workers_and_the_dead_count(operator):
    from dashboard.live.publisher import publish_queue_stats

    cookie = await cookie_for(operator)
    async with running_hub():
        client = await SSEClient("/events/overview", cookie=cookie).open()
        try:
            await submit()
            await sync_to_async(publish_queue_stats)()
            messages = await client.events(4)
            assert [m["event"] for m in messages] == ["queue-cards", "queue-chart", "workers", "dead-count"]
            assert 'id="queue-default"' in messages[0]["data"]
            assert "<svg" in messages[1]["data"]
            assert messages[3]["data"].startswith("<title>Overview · Conveyor</title>")
        finally:
            await client.close()


async def test_the_dead_letter_stream_renders_a_burst_once(operator):
    cookie = await cookie_for(operator)
    jobs = [await submit() for _ in range(3)]
    async with running_hub() as hub:
        clients = [await SSEClient("/events/dead-letter", cookie=cookie).open() for _ in range(5)]
        try:
            for client in clients:  # the snapshot: an empty queue
                (snapshot,) = await client.events(1, names={"dead-letter"})
                assert "is empty" in snapshot["data"]
            for job in jobs:
                await start(job)
                await finish(job, "dead", error_type="Boom", error_message="it broke")
            for client in clients:
                latest = ""
                while '<span class="pill dead">3</span>' not in latest:
                    (message,) = await client.events(1, names={"dead-letter"})
                    latest = message["data"]
                assert latest.count('name="job"') == 2 * 3  # Retry and Discard for each
            # One read for the snapshot, then at most one per death, shared by
            # all five viewers.
            assert hub.shared.count <= 1 + len(jobs) + 3  # +3: each job's attempts
        finally:
            for client in clients:
                await client.close()


# --- protection -------------------------------------------------------------------------


async def test_a_slow_subscriber_is_dropped_and_its_stream_ends(operator, monkeypatch):
    from dashboard import streams

    cookie = await cookie_for(operator)
    job = await submit()
    cursor = await last_event_id()
    slow = asyncio.Event()
    original = streams.ApiStream.render_one

    async def render_slowly(self, update, *, replaying):
        await slow.wait()
        return await original(self, update, replaying=replaying)

    monkeypatch.setattr(streams.ApiStream, "render_one", render_slowly)
    async with running_hub(queue_size=10) as hub:
        client = await SSEClient(f"/api/v1/events?job={job.id}&after={cursor}", cookie=cookie).open()
        try:
            await wait_for(lambda: len(hub.subscriptions) == 1)
            for percent in range(1, 30):
                await progress(job, percent)
            await wait_for(lambda: not hub.subscriptions, message="the subscriber to be dropped")
            slow.set()
            await client.body(timeout=5)
            assert client.finished
        finally:
            await client.close()


async def test_a_subscription_that_overflows_is_dropped():
    from dashboard.live.hub import SubscriberTooSlow, Subscription

    subscription = Subscription(lambda update: True, maxsize=2)
    assert subscription.offer("a") and subscription.offer("b")
    assert not subscription.offer("c")
    with pytest.raises(SubscriberTooSlow):
        await subscription.get(timeout=0.1)


async def test_a_subscription_times_out_a_full_timeout_after_each_wait_began():
    from dashboard.live.hub import Subscription

    loop = asyncio.get_running_loop()
    subscription = Subscription(lambda update: True, maxsize=10)
    loop.call_later(0.15, subscription.offer, "a")
    assert await subscription.get(timeout=0.3) == "a"
    began = loop.time()
    # The timer armed by the first wait fires at 0.3 s; this wait lasts until 0.45 s.
    assert await subscription.get(timeout=0.3) is None
    assert loop.time() - began >= 0.29
    subscription.close()


async def test_the_hub_reconnects_and_delivers_what_committed_while_it_was_away(operator):
    cookie = await cookie_for(operator)
    job = await submit()
    cursor = await last_event_id()
    async with running_hub() as hub:
        client = await SSEClient(f"/api/v1/events?job={job.id}&after={cursor}", cookie=cookie).open()
        try:
            await wait_for(lambda: hub.connects == 1)
            # As a Postgres restart would: the server ends the hub's session.
            assert await terminate_hub_sessions() == 1
            missed = [await progress(job, 10), await progress(job, 20)]
            await wait_for(lambda: hub.connects == 2, timeout=10, message="the hub to reconnect")
            assert [m["id"] for m in await client.events(2)] == missed
            after = await progress(job, 30)
            assert [m["id"] for m in await client.events(1)] == [after]
        finally:
            await client.close()


async def test_silence_is_broken_by_keepalive_comments(operator):
    cookie = await cookie_for(operator)
    async with running_hub(keepalive=0.2):
        client = await SSEClient("/api/v1/events", cookie=cookie).open()
        try:
            await wait_for_raw(client, b": keep-alive\n\n")
        finally:
            await client.close()


async def wait_for_raw(client: SSEClient, needle: bytes, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while needle not in client.raw:
        await client._read(max(0.01, deadline - asyncio.get_running_loop().time()))


async def test_anonymous_clients_are_refused():
    async with running_hub():
        dashboard = await SSEClient("/events/overview").open()
        api = await SSEClient("/api/v1/events").open()
        bearer = await SSEClient("/api/v1/events", headers=[(b"authorization", b"Bearer cvk_nope")]).open()
        assert dashboard.status == 401
        assert api.status == 401 and api.headers[b"www-authenticate"] == b"Bearer"
        assert bearer.status == 401
        for client in (dashboard, api, bearer):
            await client.body()
            await client.close()


def _api_key(scopes):
    from jobs.services import create_api_key

    return create_api_key("sse client", scopes=scopes).key


def _owner_of(key: str) -> str:
    from jobs.services import verify_api_key

    return verify_api_key(key).owner


async def test_api_clients_stream_with_a_key_that_may_read():
    reader_key = await sync_to_async(_api_key)(["read"])
    submit_only = await sync_to_async(_api_key)(["submit"])
    # A key without `operate` watches only the jobs it submitted.
    job = await submit(owner=await sync_to_async(_owner_of)(reader_key))
    async with running_hub():
        allowed = await SSEClient(
            f"/api/v1/events?job={job.id}", headers=[(b"authorization", f"Bearer {reader_key}".encode())]
        ).open()
        refused = await SSEClient(
            "/api/v1/events", headers=[(b"authorization", f"Bearer {submit_only}".encode())]
        ).open()
        try:
            assert allowed.status == 200
            (created,) = await allowed.events(1)
            assert created["event"] == "job.created"
            assert refused.status == 403
            await refused.body()
        finally:
            await allowed.close()
            await refused.close()


# --- credentials that stop being valid ----------------------------------------------


def _signed_in(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def _deactivate(user) -> None:
    from django.contrib.auth.models import User

    User.objects.filter(pk=user.pk).update(is_active=False)


def _change_password(user) -> None:
    user.set_password("a new one, elsewhere")
    user.save(update_fields=["password"])


async def _ends_within(client: SSEClient, seconds: float) -> None:
    try:
        await asyncio.wait_for(client.body(timeout=60), seconds)
    except TimeoutError:
        raise AssertionError(f"the stream was still open {seconds} s later") from None
    assert client.finished


async def _still_streaming(client: SSEClient) -> None:
    """Still open, and still delivering: a new job's event arrives."""
    job = await submit()
    (event,) = await client.events(1, names={"job.created"})
    assert json.loads(event["data"])["job"] == str(job.id)
    assert not client.finished


@pytest.mark.parametrize("ending", ["deactivation", "logout"])
async def test_a_deactivated_users_or_logged_out_sessions_streams_end_within_five_seconds(operator, reader, ending):
    browser = await sync_to_async(_signed_in)(reader)
    cookie = f"sessionid={browser.cookies['sessionid'].value}".encode()
    # Unaffected: another user's stream, or another session of the user logging out.
    still_valid = await cookie_for(operator if ending == "deactivation" else reader)
    end = sync_to_async((lambda: _deactivate(reader)) if ending == "deactivation" else browser.logout)
    async with running_hub():
        doomed_page = await SSEClient("/events/dead-letter", cookie=cookie).open()
        doomed_api = await SSEClient("/api/v1/events", cookie=cookie).open()
        other = await SSEClient("/api/v1/events", cookie=still_valid).open()
        try:
            assert doomed_page.status == doomed_api.status == other.status == 200
            await wait_for_raw(doomed_page, b": connected")
            await end()
            await _ends_within(doomed_page, 5)
            await _ends_within(doomed_api, 5)
            await _still_streaming(other)
        finally:
            for client in (doomed_page, doomed_api, other):
                await client.close()


async def test_a_password_change_ends_the_users_other_sessions_streams(operator):
    async with running_hub():
        doomed = await SSEClient("/events/overview", cookie=await cookie_for(operator)).open()
        try:
            assert doomed.status == 200
            await wait_for_raw(doomed, b": connected")
            await sync_to_async(_change_password)(operator)
            await _ends_within(doomed, 5)
        finally:
            await doomed.close()


@pytest.mark.anyio(False)
def test_checking_every_streams_credentials_takes_at_most_three_queries(operator, django_assert_max_num_queries):
    from django.contrib.sessions.models import Session

    from dashboard.api_auth import Credential, invalid_credentials
    from jobs.services import verify_api_key

    keys = [_api_key(["read"]) for _ in range(5)]
    for _ in range(3):
        _signed_in(operator)
    credentials = {Credential(api_key_id=verify_api_key(key).pk) for key in keys}
    credentials |= {
        Credential(user_id=operator.pk, session_key=key) for key in Session.objects.values_list("pk", flat=True)
    }
    gone = {Credential(api_key_id=10**9), Credential(user_id=operator.pk, session_key="logged-out")}
    with django_assert_max_num_queries(3):
        assert invalid_credentials(credentials | gone) == gone
