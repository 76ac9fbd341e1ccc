"""Retention (`jobs/engine/retention.py`, `manage.py purge_jobs`): finished history
goes, the dead-letter queue stays longer, and nothing with a webhook message
still to deliver goes at all."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs.engine.retention import purge_finished
from jobs.models import Job, State, WebhookDelivery
from jobs.webhooks import messages

pytestmark = pytest.mark.django_db


def aged(job: Job, state: State, days: float) -> Job:
    at = timezone.now() - timedelta(days=days)
    Job.objects.filter(id=job.id).update(state=state, finished_at=at, created_at=at)
    job.refresh_from_db()
    return job


def message_for(job: Job) -> WebhookDelivery:
    """A `job.<state>` message to a callback URL, with its `webhook.deliver` job, as `job_finished` makes it."""
    delivery = WebhookDelivery.objects.create(
        message_id=messages.new_message_id(),
        event_type=f"job.{job.state}",
        body="{}",
        url="https://receiver.example/hook",
        job=job,
    )
    messages.start_delivery(delivery)
    return delivery


def remaining(*jobs: Job) -> set:
    return set(Job.objects.filter(id__in=[job.id for job in jobs]).values_list("id", flat=True))


def test_dead_jobs_have_their_own_longer_retention(make_job):
    succeeded = aged(make_job(), State.SUCCEEDED, 30)
    dead_a_month = aged(make_job(), State.DEAD, 30)
    dead_long_ago = aged(make_job(), State.DEAD, 100)

    deleted = purge_finished(older_than_days=14)

    assert remaining(succeeded, dead_a_month, dead_long_ago) == {dead_a_month.id}
    assert deleted["by_state"] == {"succeeded": 1, "dead": 1}


def test_the_dead_letter_queue_defaults_to_ninety_days(settings):
    assert settings.CONVEYOR["DEAD_RETENTION_DAYS"] == 90


def test_a_job_with_a_webhook_message_still_to_deliver_is_never_purged(make_job):
    pending = aged(make_job(), State.SUCCEEDED, 400)
    message_for(pending)  # its webhook.deliver job is queued
    failing = aged(make_job(), State.DEAD, 400)
    delivery = message_for(failing)
    aged(delivery.deliver_job, State.RETRYING, 0)
    delivered = aged(make_job(), State.SUCCEEDED, 400)
    done = message_for(delivered)
    WebhookDelivery.objects.filter(id=done.id).update(delivered_at=timezone.now())
    aged(done.deliver_job, State.SUCCEEDED, 1)

    purge_finished(older_than_days=14)

    assert remaining(pending, failing, delivered) == {pending.id, failing.id}
    assert WebhookDelivery.objects.filter(job__in=[pending, failing]).count() == 2


def test_a_message_whose_delivery_job_is_in_the_dead_letter_queue_keeps_its_job(make_job):
    # An operator can still retry the delivery job from the dead-letter queue;
    # it needs the message (cascaded away with its job).
    job = aged(make_job(), State.SUCCEEDED, 30)
    delivery = message_for(job)
    aged(delivery.deliver_job, State.DEAD, 30)

    purge_finished(older_than_days=14)

    assert remaining(job, delivery.deliver_job) == {job.id, delivery.deliver_job.id}


def test_a_message_given_up_on_does_not_keep_its_job(make_job):
    job = aged(make_job(), State.SUCCEEDED, 30)
    delivery = message_for(job)
    aged(delivery.deliver_job, State.DISCARDED, 30)

    purge_finished(older_than_days=14)

    assert remaining(job, delivery.deliver_job) == set()


def test_purge_runs_in_chunks(make_job):
    jobs = [aged(make_job(), State.SUCCEEDED, 30) for _ in range(7)]

    deleted = purge_finished(older_than_days=14, chunk=3)

    assert remaining(*jobs) == set()
    assert deleted["jobs"] == 7
    assert deleted["by_state"] == {"succeeded": 7}


def test_purge_jobs_prints_what_it_deleted_by_state(make_job):
    for state, days in ((State.SUCCEEDED, 30), (State.SUCCEEDED, 30), (State.CANCELLED, 30), (State.DEAD, 100)):
        aged(make_job(), state, days)
    aged(make_job(), State.DEAD, 30)  # kept: the dead-letter queue's retention is longer
    out = StringIO()

    call_command("purge_jobs", stdout=out)

    assert out.getvalue().strip() == "deleted 4 finished jobs (succeeded 2, dead 1, cancelled 1) and 0 old events"


def test_purge_jobs_takes_the_dead_letter_queues_age(make_job):
    dead = aged(make_job(), State.DEAD, 30)
    out = StringIO()

    call_command("purge_jobs", "--dead-older-than-days", "20", stdout=out)

    assert remaining(dead) == set()
    assert "(dead 1)" in out.getvalue()
