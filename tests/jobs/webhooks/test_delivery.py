"""Delivery through real qcluster workers to a real receiver that verifies every
message with `standardwebhooks`. The "webhooks" cluster may call loopback
(CONVEYOR_WEBHOOK_ALLOW_PRIVATE=1) and runs the retry schedule 10,000 times
faster (8 attempts in about 10 s instead of 28 h)."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.models import Job, State, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.conftest import wait_until
from tests.jobs.api.conftest import ApiClient
from tests.jobs.webhooks.conftest import deliveries_of, finish, operator_owner

pytestmark = pytest.mark.processes

WEBHOOKS_CLUSTER = {"CONVEYOR_WEBHOOK_ALLOW_PRIVATE": "1", "CONVEYOR_WEBHOOK_BACKOFF_SCALE": "0.0001"}


def _endpoint(receiver, path: str, *event_types: str):
    """Register an operator's endpoint at the receiver (use with the allow_private fixture)."""
    created = services.create_endpoint(owner=operator_owner(), url=receiver.url(path), event_types=list(event_types))
    receiver.expect(path, created.secret)
    return created.endpoint


def test_a_finished_job_reaches_its_callback_and_endpoints_signed(processes, receiver, make_key, allow_private):
    api = ApiClient(make_key())
    endpoint = _endpoint(receiver, "/endpoint", "job.succeeded")
    submitted = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "callback_url": receiver.url("/callback")})
    job_id = submitted.json()["id"]
    receiver.expect("/callback", api.get("/webhooks/default/secret").json()["secret"])

    processes.qcluster(queue="default")
    processes.qcluster(queue="webhooks", **WEBHOOKS_CLUSTER)
    wait_until(lambda: len(receiver.received()) == 2, timeout=60, message="both messages")

    # The job as the API lists it (GET /jobs/{id} adds the attempts' text and logs).
    (job,) = [item for item in api.get("/jobs").json()["items"] if item["id"] == job_id]
    for path in ("/callback", "/endpoint"):
        (message,) = receiver.received(path)
        assert list(message.verified.values()) == [True], path
        assert message.json["type"] == "job.succeeded"
        assert message.json["data"] == job
    wait_until(
        lambda: all(d["status"] == "delivered" for d in api.get(f"/jobs/{job_id}/deliveries").json()),
        timeout=15,
        message="deliveries recorded",
    )
    deliveries = api.get(f"/jobs/{job_id}/deliveries").json()
    assert sorted(d["endpoint"] or "callback" for d in deliveries) == sorted([str(endpoint.id), "callback"])
    for delivery in deliveries:
        (attempt,) = delivery["attempts"]
        assert attempt["status_code"] == 200 and attempt["response_body"] == "answered 200"
        assert attempt["latency_ms"] is not None


def test_a_failing_receiver_gets_the_same_webhook_id_on_every_retry(processes, receiver, make_job, allow_private):
    _endpoint(receiver, "/flaky", "job.dead")
    receiver.answer("/flaky", 500, 503, 200)
    job = finish(make_job(), State.DEAD)

    processes.qcluster(queue="webhooks", **WEBHOOKS_CLUSTER)
    (delivery,) = deliveries_of(job)
    wait_until(lambda: Job.objects.get(id=delivery.deliver_job_id).state == State.SUCCEEDED, timeout=60)

    messages = receiver.received("/flaky")
    assert [m.message_id for m in messages] == [delivery.message_id] * 3
    assert all(m.verified and all(m.verified.values()) for m in messages)
    assert [m.json for m in messages] == [messages[0].json] * 3  # the same body, signed anew each time
    attempts = WebhookAttempt.objects.filter(delivery=delivery).order_by("number")
    assert [(a.number, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert [a.response_body for a in attempts] == ["answered 500", "answered 503", "answered 200"]
    deliver_job = Job.objects.get(id=delivery.deliver_job_id)
    assert deliver_job.attempts == 3
    assert services.delivery_status(WebhookDelivery.objects.get(id=delivery.id)) == "delivered"


def test_a_receiver_that_always_fails_dead_letters_and_redelivery_keeps_the_id(
    processes, receiver, make_job, allow_private
):
    _endpoint(receiver, "/down", "job.succeeded")
    receiver.answer("/down", 500)
    job = finish(make_job())
    (delivery,) = deliveries_of(job)

    # The whole schedule (about 30 hours) in about a second.
    processes.qcluster(queue="webhooks", **{**WEBHOOKS_CLUSTER, "CONVEYOR_WEBHOOK_BACKOFF_SCALE": "0.00001"})
    wait_until(lambda: Job.objects.get(id=delivery.deliver_job_id).state == State.DEAD, timeout=90)

    deliver_job = Job.objects.get(id=delivery.deliver_job_id)
    assert deliver_job.attempts == 8
    assert deliver_job.error_type == "DeliveryFailed"
    assert deliver_job.error_message == "the receiver answered 500"
    assert deliver_job in services.page_jobs(state="dead")
    assert WebhookAttempt.objects.filter(delivery=delivery).count() == 8
    assert len(receiver.received("/down")) == 8
    assert services.delivery_status(WebhookDelivery.objects.get(id=delivery.id)) == "failed"

    receiver.answer("/down", 200)
    again = services.redeliver(delivery.id, job_id=job.id)
    wait_until(lambda: Job.objects.get(id=again.deliver_job_id).state == State.SUCCEEDED, timeout=30)
    last = receiver.received("/down")[-1]
    assert last.message_id == delivery.message_id
    assert all(last.verified.values())
    assert services.delivery_status(WebhookDelivery.objects.get(id=delivery.id)) == "delivered"


def test_410_gone_disables_the_endpoint(processes, receiver, make_job, allow_private):
    endpoint = _endpoint(receiver, "/gone", "job.succeeded", "job.cancelled")
    receiver.answer("/gone", 410)
    job = finish(make_job())
    (delivery,) = deliveries_of(job)

    processes.qcluster(queue="webhooks", **WEBHOOKS_CLUSTER)
    wait_until(lambda: Job.objects.get(id=delivery.deliver_job_id).state == State.SUCCEEDED, timeout=60)

    deliver_job = Job.objects.get(id=delivery.deliver_job_id)
    assert deliver_job.result["gone"] is True and deliver_job.result["endpoint_disabled"] is True
    endpoint = WebhookEndpoint.objects.get(id=endpoint.id)
    assert endpoint.disabled_at is not None
    assert "410" in endpoint.disabled_reason
    assert len(receiver.received("/gone")) == 1
    assert services.delivery_status(WebhookDelivery.objects.get(id=delivery.id)) == "gone"
    assert deliveries_of(finish(make_job(), State.CANCELLED)) == []


def test_a_throttling_receiver_gets_the_next_attempt_when_its_retry_after_says(
    processes, receiver, make_job, allow_private
):
    # The cluster's schedule is 10,000 times faster (its first step is 0.5 ms)
    # and its longest delay 3.6 s: the 2 s asked for stands out from both.
    _endpoint(receiver, "/throttled", "job.succeeded")
    receiver.answer("/throttled", 429, 200, headers={"Retry-After": "2"})
    job = finish(make_job())
    (delivery,) = deliveries_of(job)

    processes.qcluster(queue="webhooks", **WEBHOOKS_CLUSTER)
    wait_until(lambda: Job.objects.get(id=delivery.deliver_job_id).state == State.SUCCEEDED, timeout=60)

    first, second = receiver.received("/throttled")
    assert first.message_id == second.message_id == delivery.message_id
    assert second.at - first.at >= 2.0
    attempts = WebhookAttempt.objects.filter(delivery=delivery).order_by("number")
    assert [(a.number, a.status_code) for a in attempts] == [(1, 429), (2, 200)]
