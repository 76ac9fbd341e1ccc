"""The charts page (per range and queue, from the rollup) and the workers page
(from heartbeats and leases) through Django's test client."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.engine.rollup import roll_up
from jobs.models import Attempt, Job, State


def _finished(kind: str, queue: str, minutes_ago: float, run_ms: float, outcome: str = "succeeded") -> None:
    finished = timezone.now() - timedelta(minutes=minutes_ago)
    job = Job.objects.create(kind=kind, queue=queue, state=State.SUCCEEDED, finished_at=finished, attempts=1)
    Attempt.objects.create(
        job=job, number=1, started_at=finished - timedelta(milliseconds=run_ms), finished_at=finished, outcome=outcome
    )


@pytest.fixture
def rolled(db):
    _finished("demo.sleep", "default", 5, 1200)
    _finished("demo.sleep", "default", 5, 1300, outcome="failed")
    _finished("llm.generate", "llm", 6, 800)
    _finished("demo.sleep", "default", 60 * 5, 900)  # in the day, not the hour
    _finished("demo.sleep", "default", 60 * 24 * 3, 900)  # in the week only
    roll_up()


def _kind_rows(html: str, heading: str) -> str:
    start = html.index(heading)
    return html[start : html.index("</table>", start)]


@pytest.mark.parametrize("range_name, points", [("1h", 60), ("24h", 96), ("7d", 168)])
def test_charts_per_range(reader_client, rolled, range_name, points):
    response = reader_client.get(f"/charts/?range={range_name}")
    assert response.status_code == 200
    html = response.content.decode()
    assert f'aria-label="Throughput over the last {range_name}"' in html
    # Every step of the range is drawn as one horizontal segment.
    throughput = response.context["charts"][0]
    assert throughput.series[0].points.count("L") == 2 * points - 1
    totals = {s.name: s.last for s in throughput.series}
    expected = {"1h": (2, 1), "24h": (3, 1), "7d": (4, 1)}[range_name]
    assert (totals["succeeded"], totals["failed"]) == expected


def test_charts_per_queue_and_the_kind_tables(reader_client, rolled):
    everything = reader_client.get("/charts/").content.decode()
    hour = _kind_rows(everything, "By kind, last hour")
    assert "demo.sleep" in hour and "llm.generate" in hour
    # 1 of 2 default attempts failed in the hour: 50 %, p50 of 1.2/1.3 s.
    assert "50 %" in hour
    day = _kind_rows(everything, "By kind, last 24 hours")
    assert ">2<" in day  # demo.sleep: 2 succeeded in the day
    llm = reader_client.get("/charts/?range=24h&queue=llm")
    assert llm.status_code == 200
    html = llm.content.decode()
    assert "llm.generate" in _kind_rows(html, "By kind, last hour")
    assert "demo.sleep" not in html.split('id="rollup"', 1)[1]
    totals = {s.name: s.last for s in llm.context["charts"][0].series}
    assert totals == {"succeeded": 1, "failed": 0}
    # htmx asks for the part below the form.
    partial = reader_client.get("/charts/?range=7d&queue=llm", HTTP_HX_REQUEST="true")
    assert partial.content.decode().startswith('<div id="rollup"')


def test_an_unknown_range_is_a_precise_error_not_a_500(reader_client, db):
    response = reader_client.get("/charts/?range=2w&queue=default")
    assert response.status_code == 422
    assert "range: &#x27;2w&#x27; is not a range; choose one of 1h, 24h, 7d." in response.content.decode()
    long_queue = reader_client.get("/charts/?queue=" + "q" * 101)
    assert long_queue.status_code == 422
    assert "queue: at most 100 characters." in long_queue.content.decode()


def test_the_workers_page_lists_clusters_workers_memory_and_jobs(operator_client, heartbeat):
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage
    from django_q.status import Stat, Status

    from jobs.engine.states import transition
    from jobs.services import submit_job

    host = socket.gethostname()
    beat = Status(pid=4321, cluster_id="c0ffee00-0000-0000-0000-000000000001")
    beat.status = "Working"
    beat.workers = [1000, 1001]
    beat.tob = timezone.now() - timedelta(minutes=5)
    beat.queue = "llm"
    beat.conveyor_memory = {1000: (150 * 1024 * 1024, 90 * 1024 * 1024)}
    get_broker().set_stat(Stat.get_key(beat.cluster_id), SignedPackage.dumps(beat, True), 60)
    job = submit_job("demo.sleep", {"seconds": 1}).job
    transition(job.id, target=State.RUNNING, lease_owner=f"{host}:1000")

    response = operator_client.get("/workers/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "queue llm" in html and "Working" in html and "5 min ago</time>" in html
    worker = html[html.index('id="worker-1000"') : html.index('id="worker-1001"')]
    assert f'href="/jobs/{job.id}/"' in worker and "demo.sleep" in worker
    assert "150.0\xa0MB" in worker and "90.0\xa0MB" in worker
    idle = html[html.index('id="worker-1001"') :]
    assert "idle" in idle.split("</tr>")[0]
    # The polled partial is the list alone.
    partial = operator_client.get("/workers/", HTTP_HX_REQUEST="true").content.decode()
    assert partial.startswith('<div id="worker-list"') and f"/jobs/{job.id}/" in partial


def test_the_workers_page_without_clusters_says_how_to_start_one(operator_client, heartbeat):
    html = operator_client.get("/workers/").content.decode()
    assert "No cluster is online" in html


def test_the_heartbeat_carries_each_workers_memory():
    from jobs.djangoq.cluster import worker_memory

    memory = worker_memory([os.getpid(), 2**22 + 7])  # ourselves, and no such process
    rss, pss = memory[os.getpid()]
    assert rss > 10 * 1024 * 1024
    assert pss is None or 0 < pss <= rss
    assert list(memory) == [os.getpid()]
