"""Retention (`jobs/engine/retention.py`, `manage.py purge_jobs`): finished history
goes, the dead-letter queue stays longer, and nothing with a webhook message
still to deliver goes at all."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import models
from django.utils import timezone

from jobs.engine.retention import RELATIONS, purge_finished
from jobs.models import Attempt, Batch, Job, JobDependency, JobEvent, Page, State, WebhookAttempt, WebhookDelivery
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


def test_every_reference_to_a_job_or_an_attempt_is_handled_as_its_model_says():
    # The purge deletes with SQL, not Django's collector: a foreign key added to
    # a model must join RELATIONS (and the purge's statements) with it.
    found = {}
    for model in (Job, Attempt):
        for relation in model._meta.get_fields(include_hidden=True):
            if not relation.auto_created or relation.concrete:
                continue
            key = (relation.related_model._meta.db_table, relation.field.column)
            found[key] = {models.CASCADE: "cascade", models.SET_NULL: "set null"}.get(relation.on_delete, "?")
    assert found == RELATIONS


def _attempt(job: Job) -> Attempt:
    at = timezone.now() - timedelta(days=30)
    return Attempt.objects.create(job=job, number=1, started_at=at, finished_at=at, outcome="succeeded")


def test_purge_deletes_what_hangs_on_a_job_and_unlinks_what_only_points_at_it(make_job):
    old = aged(make_job(), State.SUCCEEDED, 30)
    _attempt(old)
    delivered = message_for(old)
    deliver_job = aged(delivered.deliver_job, State.SUCCEEDED, 30)
    WebhookDelivery.objects.filter(id=delivered.id).update(delivered_at=timezone.now())
    WebhookAttempt.objects.create(
        delivery=delivered, deliver_job=deliver_job, job_attempt=_attempt(deliver_job), number=1,
        started_at=timezone.now(), status_code=200,
    )  # fmt: skip
    fresh = make_job()  # its message's delivery job is old and purged: the message stays, unlinked
    kept_message = message_for(fresh)
    kept_deliver_job = aged(kept_message.deliver_job, State.SUCCEEDED, 30)
    WebhookDelivery.objects.filter(id=kept_message.id).update(delivered_at=timezone.now())
    kept_attempt = WebhookAttempt.objects.create(
        delivery=kept_message, deliver_job=kept_deliver_job, job_attempt=_attempt(kept_deliver_job), number=1,
        started_at=timezone.now(), status_code=200,
    )  # fmt: skip
    JobDependency.objects.create(job=fresh, depends_on=old, resolved=True, outcome="succeeded")
    batch = Batch.objects.create(name="b", then_job=old)
    page = Page.objects.create(job=old, slug="p", title="P", body_markdown="x")

    deleted = purge_finished(older_than_days=14)

    assert deleted["by_state"] == {"succeeded": 3}
    assert remaining(old, deliver_job, kept_deliver_job, fresh) == {fresh.id}
    assert not Attempt.objects.filter(job__in=[old, deliver_job, kept_deliver_job]).exists()
    assert not JobEvent.objects.filter(job__in=[old, deliver_job, kept_deliver_job]).exists()
    assert not WebhookDelivery.objects.filter(id=delivered.id).exists()
    assert not JobDependency.objects.exists()
    kept_message.refresh_from_db()
    kept_attempt.refresh_from_db()
    batch.refresh_from_db()
    page.refresh_from_db()
    assert kept_message.deliver_job_id is None
    assert (kept_attempt.deliver_job_id, kept_attempt.job_attempt_id) == (None, None)
    assert (batch.then_job_id, page.job_id) == (None, None)
    assert WebhookAttempt.objects.count() == 1


def test_purge_goes_oldest_first_and_leaves_younger_jobs(make_job):
    jobs = [aged(make_job(), State.SUCCEEDED, days) for days in (40, 30, 20, 10)]

    deleted = purge_finished(older_than_days=15, chunk=1)

    assert deleted["jobs"] == 3
    assert remaining(*jobs) == {jobs[-1].id}
