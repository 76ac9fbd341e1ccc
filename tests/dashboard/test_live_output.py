"""Streamed text through the hub: `job.output` events reach a job's page from
the rows the hub reads anyway, so many jobs streaming to many viewers cost
no database statement per chunk per viewer."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from tests.dashboard.conftest import SSEClient, running_hub, session_cookie

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]

JOBS = 100
FLUSHES = 8


def _running_jobs(count: int) -> list:
    from jobs.services import submit_job
    from jobs.worker import claims

    jobs = [submit_job("demo.noop", {}).job for _ in range(count)]
    for job in jobs:
        assert claims.claim(str(job.id), "lane:1")
    return jobs


def _flush(jobs: list, round: int) -> None:
    """One lane flush: every job's new text (and a log line) in one statement."""
    from jobs.worker.heartbeat import Progress, record_progress

    before, chunk = _text(range(round)), f"chunk {round} "
    reports = {
        job.id: Progress(
            round,
            f"streaming, {len(before + chunk)} characters",
            "lane:1",
            before + chunk,
            attempt=1,
            offset=len(before),
            delta=chunk,
            logs=f"line {round}",
            lines=(f"line {round}",),
            first=round,
        )
        for job in jobs
    }
    assert len(record_progress(reports)) == len(jobs)


def _text(rounds: range) -> str:
    return "".join(f"chunk {r} " for r in rounds)


def _last_event_id() -> int:
    from dashboard.queries import latest_event_id

    return latest_event_id()


async def _stream(jobs: list, rounds: range, *, viewers_per_job: int, watched: int, cookie: bytes):
    """Flush each of `rounds` while `watched` jobs each have `viewers_per_job`
    pages open and two API clients follow the queue. Returns the hub's event
    reads and shared reads, and the `job-output` messages each page got."""
    cursor = await sync_to_async(_last_event_id)()
    async with running_hub() as hub:
        pages = [
            (job.id, await SSEClient(f"/events/jobs/{job.id}?after={cursor}", cookie=cookie).open())
            for job in jobs[:watched]
            for _ in range(viewers_per_job)
        ]
        feeds = [
            await SSEClient(f"/api/v1/events?queue=default&after={cursor}", cookie=cookie).open() for _ in range(2)
        ]
        # The queue's followers read as the events come (3 per job and flush).
        following = [asyncio.create_task(feed.events(3 * len(jobs) * len(rounds), timeout=60)) for feed in feeds]
        try:
            reads, shared = hub.reads, hub.shared.count
            for round in rounds:
                await sync_to_async(_flush)(jobs, round)
            received = []
            for job_id, client in pages:
                output, logs = f"job-output-{job_id}", f"job-logs-{job_id}"
                messages = await client.events(2 * len(rounds), names={output, logs}, timeout=30)
                received.append([m for m in messages if m["event"] == output])
                lines = [json.loads(m["data"])["lines"] for m in messages if m["event"] == logs]
                assert lines == [[f"line {r}"] for r in rounds]
            for messages in await asyncio.gather(*following):
                assert {m["event"] for m in messages} == {"job.progress", "job.output", "job.log"}
            return hub.reads - reads, hub.shared.count - shared, received
        finally:
            for _, client in pages:
                await client.close()
            for feed in feeds:
                await feed.close()


def _joined(messages: list[dict], rounds: range) -> str:
    """The text the deltas make, checking that each starts where the last ended."""
    text = _text(range(rounds.start))
    for message in messages:
        data = json.loads(message["data"])
        assert (data["attempt"], data["offset"]) == (1, len(text))
        text += data["text"]
    return text


async def test_a_hundred_streaming_jobs_cost_the_hub_the_same_reads_for_one_viewer_or_many(operator):
    cookie = await sync_to_async(session_cookie)(operator)
    jobs = await sync_to_async(_running_jobs)(JOBS)
    # Each flush is one burst of 300 notifications (its events commit
    # together), read back in a few queries (one per packet that arrives
    # while the previous read runs), however many streams watch.
    bound = 3 * FLUSHES

    first = range(0, FLUSHES)
    reads, shared, received = await _stream(jobs, first, viewers_per_job=1, watched=1, cookie=cookie)
    assert 1 <= reads <= bound and shared == 0  # the text needs nothing beyond the event itself
    assert _joined(received[0], first) == _text(first)

    # 20 jobs watched by 5 pages each, 100 streams, and the same 100 jobs streaming.
    then = range(FLUSHES, 2 * FLUSHES)
    reads, shared, received = await _stream(jobs, then, viewers_per_job=5, watched=20, cookie=cookie)
    assert 1 <= reads <= bound and shared == 0  # while 800 output messages went out to pages
    assert len(received) == 100
    for messages in received:
        assert _joined(messages, then) == _text(range(2 * FLUSHES))


async def test_a_job_page_that_reconnects_with_last_event_id_gets_the_rest_of_the_text_once(operator):
    cookie = await sync_to_async(session_cookie)(operator)
    (job,) = await sync_to_async(_running_jobs)(1)
    output = f"job-output-{job.id}"
    async with running_hub():
        page = await SSEClient(f"/events/jobs/{job.id}", cookie=cookie).open()
        try:
            for round in range(3):
                await sync_to_async(_flush)([job], round)
            before = await page.events(3, names={output})
        finally:
            await page.close()
        for round in range(3, 6):  # while the page is away
            await sync_to_async(_flush)([job], round)
        again = await SSEClient(
            f"/events/jobs/{job.id}", cookie=cookie, headers=[(b"last-event-id", str(before[-1]["id"]).encode())]
        ).open()
        try:
            await sync_to_async(_flush)([job], 6)
            after = await again.events(4, names={output})
        finally:
            await again.close()
    # The deltas of both connections join up, none repeated, none missing.
    assert _joined(before + after, range(0, 7)) == _text(range(7))
