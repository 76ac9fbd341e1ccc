"""A receiver that answers 429 or 503 with Retry-After gets the next attempt
when it asked (bounded), not at the schedule's next step. Each test runs one
delivery attempt in this process against the real loopback receiver."""

from __future__ import annotations

from datetime import timedelta
from email.utils import format_datetime

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import Job, State, WebhookAttempt
from jobs.webhooks.handler import SCHEDULE
from tests.jobs.webhooks.conftest import deliveries_of, finish, operator_owner, run_delivery

pytestmark = pytest.mark.django_db(transaction=True)


def _first_attempt(receiver, make_job, status: int, headers: dict[str, str]) -> tuple[Job, float]:
    """Deliver one message to a receiver answering `status` with `headers`: the
    delivery job afterwards, and the seconds from the attempt to its next run."""
    created = services.create_endpoint(owner=operator_owner(), url=receiver.url("/busy"), event_types=["job.succeeded"])
    receiver.expect("/busy", created.secret)
    receiver.answer("/busy", status, headers=headers)
    (delivery,) = deliveries_of(finish(make_job()))
    before = timezone.now()
    deliver_job = run_delivery(delivery)
    assert deliver_job.state == State.RETRYING
    assert len(receiver.received("/busy")) == 1
    return deliver_job, (deliver_job.run_after - before).total_seconds()


@pytest.mark.parametrize("status", [429, 503])
def test_it_retries_when_the_receiver_asks_in_seconds(receiver, make_job, allow_private, status):
    deliver_job, delay = _first_attempt(receiver, make_job, status, {"Retry-After": "120"})
    assert 119 <= delay <= 125  # the schedule's next step would be about 5 s
    assert deliver_job.attempts == 1
    assert deliver_job.error_message == f"the receiver answered {status}"
    (attempt,) = WebhookAttempt.objects.filter(deliver_job_id=deliver_job.id)
    assert attempt.status_code == status


def test_it_retries_when_the_receiver_asks_with_an_http_date(receiver, make_job, allow_private):
    when = timezone.now() + timedelta(minutes=20)
    _, delay = _first_attempt(receiver, make_job, 503, {"Retry-After": format_datetime(when, usegmt=True)})
    assert 20 * 60 - 5 <= delay <= 20 * 60 + 5


def test_a_retry_after_beyond_the_schedules_longest_delay_is_cut_to_it(receiver, make_job, allow_private):
    _, delay = _first_attempt(receiver, make_job, 429, {"Retry-After": str(30 * 86400)})
    assert max(SCHEDULE) - 5 <= delay <= max(SCHEDULE) + 5


def test_a_retry_after_on_another_answer_is_ignored(receiver, make_job, allow_private):
    _, delay = _first_attempt(receiver, make_job, 500, {"Retry-After": "3600"})
    assert 4 <= delay <= 7  # the schedule's first step, 5 s ± 10 %


def test_an_unreadable_retry_after_falls_back_to_the_schedule(receiver, make_job, allow_private):
    _, delay = _first_attempt(receiver, make_job, 503, {"Retry-After": "soon"})
    assert 4 <= delay <= 7
