"""GET /metrics: what it reports, that it is read from the database, and its token."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import Job
from jobs.worker import runner
from tests.conftest import ROOT, held_transaction, process_env, wait_until

pytestmark = pytest.mark.django_db


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def deliver(job: Job) -> None:
    runner.run_job(str(job.id))


def test_it_reports_queue_depth_by_state_and_the_oldest_runnable_job(client, make_job):
    first = make_job("demo.noop")
    make_job("demo.noop")
    make_job("demo.noop", depends_on=[first.id])  # waiting: not runnable
    make_job("demo.noop", run_after=timezone.now() + timedelta(hours=1))  # scheduled: not runnable
    make_job("demo.noop", queue="llm")
    dead = make_job("demo.fail", {"mode": "permanent"})
    deliver(dead)
    Job.objects.filter(state="queued", queue="default").update(created_at=timezone.now() - timedelta(seconds=90))

    samples = scrape(client)

    assert value(samples, "conveyor_queue_depth", queue="default", state="queued") == 2
    assert value(samples, "conveyor_queue_depth", queue="default", state="waiting") == 1
    assert value(samples, "conveyor_queue_depth", queue="default", state="scheduled") == 1
    assert value(samples, "conveyor_queue_depth", queue="default", state="running") == 0
    assert value(samples, "conveyor_queue_depth", queue="default", state="dead") == 1
    assert value(samples, "conveyor_queue_depth", queue="llm", state="queued") == 1
    # now() is the test transaction's start, a little before the jobs were made.
    assert 80 <= value(samples, "conveyor_oldest_runnable_job_age_seconds", queue="default") < 120
    assert value(samples, "conveyor_oldest_runnable_job_age_seconds", queue="llm") < 5


def test_configured_queues_are_reported_even_when_empty(client, settings):
    settings.CONVEYOR_QUEUES = ["default", "bulk"]
    samples = scrape(client)
    assert ("conveyor_queue_depth", (("queue", "bulk"), ("state", "queued"))) in samples
    assert ("conveyor_clusters_online", (("queue", "bulk"),)) in samples
    assert value(samples, "conveyor_oldest_runnable_job_age_seconds", queue="bulk") == 0


def test_counters_count_submissions_finishes_and_attempts_by_kind_queue_and_outcome(client, make_job):
    before = scrape(client)
    for _ in range(3):
        deliver(make_job("demo.noop"))
    flaky = make_job("demo.fail", {"mode": "transient", "succeed_on_attempt": 2}, backoff_base=0.01, backoff_max=0.01)
    deliver(flaky)
    Job.objects.filter(id=flaky.id).update(run_after=timezone.now() - timedelta(seconds=1))
    deliver(flaky)
    deliver(make_job("demo.fail", {"mode": "permanent"}))
    make_job("demo.noop", queue="llm")  # submitted, never run
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("conveyor_jobs_submitted_total", kind="demo.noop", queue="default") == 3
    assert delta("conveyor_jobs_submitted_total", kind="demo.noop", queue="llm") == 1
    assert delta("conveyor_jobs_submitted_total", kind="demo.fail", queue="default") == 2
    assert delta("conveyor_jobs_finished_total", kind="demo.noop", queue="default", outcome="succeeded") == 3
    assert delta("conveyor_jobs_finished_total", kind="demo.fail", queue="default", outcome="succeeded") == 1
    assert delta("conveyor_jobs_finished_total", kind="demo.fail", queue="default", outcome="dead") == 1
    assert delta("conveyor_attempts_total", kind="demo.fail", queue="default", outcome="failed") == 2
    assert delta("conveyor_attempts_total", kind="demo.fail", queue="default", outcome="succeeded") == 1
    assert delta("conveyor_attempts_total", kind="demo.noop", queue="default", outcome="succeeded") == 3
    # The histogram: every attempt that succeeded or failed, in cumulative buckets.
    assert delta("conveyor_attempt_duration_seconds_count", kind="demo.noop") == 3
    assert delta("conveyor_attempt_duration_seconds_bucket", kind="demo.noop", le="+Inf") == 3
    assert delta("conveyor_attempt_duration_seconds_bucket", kind="demo.fail", le="+Inf") == 3
    assert delta("conveyor_attempt_duration_seconds_bucket", kind="demo.noop", le="3600.0") == 3
    assert 0 <= delta("conveyor_attempt_duration_seconds_sum", kind="demo.noop") < 5
    buckets = [
        v
        for (name, labels), v in after.items()
        if name == "conveyor_attempt_duration_seconds_bucket" and ("kind", "demo.noop") in labels
    ]
    assert buckets == sorted(buckets)


def test_counters_are_not_lowered_by_purging_or_by_a_dead_job_being_retried(client, make_job):
    from jobs.engine.deadletter import retry_job
    from jobs.engine.retention import purge_finished

    job = make_job("demo.fail", {"mode": "permanent"})
    deliver(job)
    before = scrape(client)
    retry_job(job.id)
    Job.objects.filter(finished_at__isnull=False).update(finished_at=timezone.now() - timedelta(days=400))
    purge_finished(older_than_days=30)
    after = scrape(client)
    for name, labels in before:
        if name.endswith(("_total", "_bucket", "_count")) and name.startswith("conveyor_"):
            assert after.get((name, labels), 0) >= before[(name, labels)], (name, labels)


def test_a_rolled_back_submission_is_not_counted(client, make_job):
    from django.db import transaction

    before = scrape(client)
    with pytest.raises(RuntimeError), transaction.atomic():
        make_job("demo.noop", queue="rollback")
        raise RuntimeError
    assert value(scrape(client), "conveyor_jobs_submitted_total", kind="demo.noop", queue="rollback") == value(
        before, "conveyor_jobs_submitted_total", kind="demo.noop", queue="rollback"
    )


def test_webhook_deliveries_are_counted_by_outcome(client, make_job):
    before = scrape(client)
    # A delivery whose message no longer exists ends at once (succeeded, skipped).
    deliver(make_job("webhook.deliver", {"delivery": str(uuid.uuid4())}, internal=True))  # as the engine does
    after = scrape(client)
    delivered = value(after, "conveyor_webhook_deliveries_total", outcome="delivered")
    assert delivered - value(before, "conveyor_webhook_deliveries_total", outcome="delivered") == 1
    assert ("conveyor_webhook_deliveries_total", (("outcome", "failed"),)) in after


def test_it_counts_clusters_and_workers_online_per_queue(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default", "llm"]
    heartbeat("default", workers=2)
    heartbeat("default", workers=3)
    heartbeat("llm", workers=4, age_seconds=45)  # too old
    heartbeat("llm", workers=4, status="Stopping")
    samples = scrape(client)
    assert value(samples, "conveyor_clusters_online", queue="default") == 2
    assert value(samples, "conveyor_workers_online", queue="default") == 5
    assert ("conveyor_clusters_online", (("queue", "llm"),)) in samples
    assert value(samples, "conveyor_clusters_online", queue="llm") == 0


def test_it_reports_running_jobs_whose_lease_expired(client, make_job):
    job = make_job("demo.noop")
    Job.objects.filter(id=job.id).update(
        state="running", lease_owner="gone:1", lease_expires_at=timezone.now() - timedelta(seconds=5)
    )
    assert value(scrape(client), "conveyor_expired_leases", queue="default") == 1


def test_a_scrape_is_a_handful_of_queries(client, make_job, django_assert_max_num_queries, heartbeat):
    for _ in range(5):
        deliver(make_job("demo.noop"))
    heartbeat("default")
    # queue stats, expired leases, counters, the oldest transaction; the cache reads of Django-Q2's
    # heartbeats (the key list, each cluster's, and its write-back of the list).
    with django_assert_max_num_queries(11):
        scrape(client)


def test_the_openmetrics_format_is_served_when_asked_for(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().rstrip().endswith("# EOF")


def test_with_a_token_it_wants_the_bearer_token(client, settings):
    settings.METRICS_TOKEN = "s3cret-token"
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert b"conveyor_" not in missing.content
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_without_a_token_it_is_open(client, settings):
    settings.METRICS_TOKEN = None
    assert client.get("/metrics").status_code == 200


def test_only_get_is_allowed(client):
    assert client.post("/metrics").status_code == 405


def test_the_token_can_come_from_a_file(tmp_path):
    token_file = tmp_path / "metrics_token"
    token_file.write_text("from-a-file\n")
    env = process_env(METRICS_TOKEN_FILE=str(token_file))
    env.pop("METRICS_TOKEN", None)
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", "from django.conf import settings; print(settings.METRICS_TOKEN)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "from-a-file"


def test_the_counters_table_is_small_and_indexed():
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'conveyor_counter'")
        (index,) = [row[0] for row in cursor.fetchall()]
    assert "(metric, kind, queue, label, shard)" in index


def test_it_reports_paused_queues_and_their_limits(client):
    from jobs import services

    services.pause_queue("llm")
    services.set_max_running("default", 3)
    samples = scrape(client)
    assert value(samples, "conveyor_queue_paused", queue="llm") == 1
    assert value(samples, "conveyor_queue_paused", queue="default") == 0
    assert value(samples, "conveyor_queue_max_running", queue="default") == 3
    assert ("conveyor_queue_max_running", (("queue", "llm"),)) not in samples  # no limit: no sample


@pytest.mark.django_db(transaction=True)  # pg_stat_activity is read once per transaction
def test_it_reports_the_oldest_open_transaction_and_the_idle_in_transaction_one(client, make_job):
    def ages() -> tuple[float, float, float]:
        samples = scrape(client)
        return (
            value(samples, "conveyor_oldest_transaction_age_seconds"),
            value(samples, "conveyor_oldest_idle_in_transaction_age_seconds"),
            value(samples, "conveyor_oldest_backend_xmin_age"),
        )

    with held_transaction("pinned-by-test") as pid:
        # The test's own transaction (the scrape's connection) is not counted.
        oldest, idle, _ = wait_until(lambda: (a := ages())[0] >= 1.5 and a, timeout=15, message="an age of 1.5 s")
        assert idle >= 1.5
        assert abs(oldest - idle) < 0.5
        # Its snapshot falls behind as soon as another transaction writes.
        make_job("demo.noop")
        assert ages()[2] >= 1
        from jobs.services import oldest_transaction

        horizon = oldest_transaction()
        assert horizon["pid"] == pid
        assert horizon["application_name"] == "pinned-by-test"
        assert horizon["state"] == "idle in transaction"
        assert "txid_current" in horizon["query"]
    oldest, idle, xmin = wait_until(lambda: (a := ages())[0] < 1 and a, timeout=15, message="the age to drop")
    assert idle < 1
    assert xmin == 0
