"""Submitting jobs: validation, defaults, scheduling and idempotency."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from jobs.engine.submission import submit_job
from jobs.errors import IdempotencyKeyReused, InvalidJob, PayloadTooLarge, UnknownKind
from jobs.models import Job, JobEvent, State
from jobs.worker.runner import run_job

pytestmark = pytest.mark.django_db


def assert_nothing_written() -> None:
    assert Job.objects.count() == 0
    assert JobEvent.objects.count() == 0
    assert OrmQ.objects.count() == 0


def refused(kind: str, payload, **options) -> InvalidJob:
    with pytest.raises(InvalidJob) as caught:
        submit_job(kind, payload, **options)
    assert_nothing_written()
    return caught.value


def fields_of(error: InvalidJob) -> list[str]:
    return [e["field"] for e in error.errors]


# --- refused submissions ----------------------------------------------------


def test_an_unknown_kind_is_refused_naming_the_known_kinds():
    error = refused("demo.nope", {})
    assert isinstance(error, UnknownKind)
    assert fields_of(error) == ["kind"]
    assert "'demo.nope'" in error.message
    for kind in ("demo.fail", "demo.noop", "demo.sleep"):
        assert kind in error.message


def test_a_kind_that_is_not_a_string_is_refused():
    assert isinstance(refused(["demo.noop"], {}), UnknownKind)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"seconds": "soon"}, "payload.seconds"),
        ({"seconds": [1]}, "payload.seconds"),
        ({"seconds": 1, "steps": "many"}, "payload.steps"),
        ({"seconds": 1, "steps": 2.5}, "payload.steps"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused(payload, field):
    error = refused("demo.sleep", payload)
    assert field in fields_of(error)


def test_a_missing_required_field_is_refused():
    assert fields_of(refused("demo.sleep", {})) == ["payload.seconds"]


def test_an_extra_field_is_refused():
    error = refused("demo.sleep", {"seconds": 1, "colour": "blue"})
    assert fields_of(error) == ["payload.colour"]


@pytest.mark.parametrize("payload", [[], "seconds=1", 3, None])
def test_a_payload_that_is_not_an_object_is_refused(payload):
    error = refused("demo.noop", payload)
    assert error.errors == [{"field": "payload", "message": "must be a JSON object"}]


def test_a_payload_over_256_kib_is_refused_as_too_large():
    error = refused("demo.fail", {"message": "x" * (256 * 1024)})
    assert isinstance(error, PayloadTooLarge)
    assert "256 KiB" in error.message


def test_a_payload_just_under_the_limit_passes_the_size_check():
    # 2 000 characters is the handler's own limit, far below 256 KiB: the
    # size check must not refuse it, the schema decides.
    job = submit_job("demo.fail", {"message": "é" * 2000}).job
    assert job.payload["message"] == "é" * 2000


def test_negative_seconds_are_refused():
    assert fields_of(refused("demo.sleep", {"seconds": -1})) == ["payload.seconds"]


def test_zero_steps_are_refused():
    assert fields_of(refused("demo.sleep", {"seconds": 1, "steps": 0})) == ["payload.steps"]


@pytest.mark.parametrize("max_attempts", [0, 51, -1, "3", 2.0, True])
def test_max_attempts_outside_1_to_50_are_refused(max_attempts):
    assert fields_of(refused("demo.noop", {}, max_attempts=max_attempts)) == ["max_attempts"]


@pytest.mark.parametrize("queue", ["bad queue", "queue/1", "x" * 101, "ü", 7])
def test_a_bad_queue_name_is_refused(queue):
    assert fields_of(refused("demo.noop", {}, queue=queue)) == ["queue"]


def test_a_naive_run_after_is_refused():
    error = refused("demo.noop", {}, run_after=datetime(2030, 1, 1, 12, 0))
    assert fields_of(error) == ["run_after"]
    assert "time zone" in error.message


def test_a_run_after_more_than_a_year_ahead_is_refused():
    assert fields_of(refused("demo.noop", {}, run_after=timezone.now() + timedelta(days=400))) == ["run_after"]


@pytest.mark.parametrize("url", ["not a url", "ftp://example.com/hook", "javascript:alert(1)"])
def test_a_bad_callback_url_is_refused(url):
    assert "callback_url" in fields_of(refused("demo.noop", {}, callback_url=url))


@pytest.mark.parametrize("key", ["k" * 256, ""])
def test_an_idempotency_key_outside_1_to_255_characters_is_refused(key):
    assert fields_of(refused("demo.noop", {}, idempotency_key=key)) == ["idempotency_key"]


@pytest.mark.parametrize("priority", [1001, -1001, "high", 1.5])
def test_a_priority_outside_the_range_is_refused(priority):
    assert fields_of(refused("demo.noop", {}, priority=priority)) == ["priority"]


def test_a_backoff_max_below_backoff_base_is_refused():
    assert fields_of(refused("demo.noop", {}, backoff_base=10.0, backoff_max=5.0)) == ["backoff_max"]


def test_every_problem_is_reported_at_once():
    error = refused("demo.sleep", {"seconds": -1, "extra": 1}, queue="no way", max_attempts=0)
    assert set(fields_of(error)) == {"payload.seconds", "payload.extra", "queue", "max_attempts"}


# --- accepted submissions ---------------------------------------------------


def test_defaults_are_filled_in():
    submitted = submit_job("demo.sleep", {"seconds": 1})

    assert submitted.created is True
    job = Job.objects.get(id=submitted.job.id)
    assert job.payload == {"seconds": 1.0, "steps": 10}
    assert job.state == State.QUEUED
    assert job.queue == "default"
    assert job.max_attempts == 5
    assert (job.backoff_base, job.backoff_max) == (2.0, 600.0)
    assert job.timeout == 3700
    assert job.attempts == 0
    assert job.run_after is None


def test_a_submission_writes_one_created_event_and_one_broker_row():
    job = submit_job("demo.noop", {}, queue="emails").job

    event = JobEvent.objects.get(job=job)
    assert event.type == "job.created"
    assert event.data == {"state": "queued", "kind": "demo.noop"}
    row = OrmQ.objects.get()
    assert row.key == "emails"
    assert row.task["args"] == (str(job.id),)
    assert row.task["func"] is run_job


def test_a_run_after_in_the_future_schedules_the_job_and_its_broker_row():
    run_after = timezone.now() + timedelta(minutes=5)

    job = submit_job("demo.noop", {}, run_after=run_after).job

    job.refresh_from_db()
    assert job.state == State.SCHEDULED
    assert job.run_after == run_after
    assert OrmQ.objects.get().lock == run_after


def test_a_run_after_in_the_past_queues_the_job_at_once():
    before = timezone.now()
    job = submit_job("demo.noop", {}, run_after=before - timedelta(minutes=5)).job

    assert Job.objects.get(id=job.id).state == State.QUEUED
    assert OrmQ.objects.get().lock >= before


def test_the_same_key_and_request_give_back_the_same_job():
    first = submit_job("demo.sleep", {"seconds": 1}, idempotency_key="order-1", owner="alice")
    second = submit_job("demo.sleep", {"seconds": 1}, idempotency_key="order-1", owner="alice")

    assert first.created is True
    assert second.created is False
    assert second.job.id == first.job.id
    assert Job.objects.count() == 1
    assert JobEvent.objects.count() == 1
    assert OrmQ.objects.count() == 1


def test_an_equivalent_payload_counts_as_the_same_request():
    first = submit_job("demo.sleep", {"seconds": 1}, idempotency_key="k", owner="alice")
    second = submit_job("demo.sleep", {"steps": 10, "seconds": 1.0}, idempotency_key="k", owner="alice")

    assert second.created is False
    assert second.job.id == first.job.id


def test_the_same_key_with_a_different_request_is_refused():
    first = submit_job("demo.sleep", {"seconds": 1}, idempotency_key="order-1", owner="alice")

    with pytest.raises(IdempotencyKeyReused) as caught:
        submit_job("demo.sleep", {"seconds": 2}, idempotency_key="order-1", owner="alice")

    assert caught.value.job_id == first.job.id
    assert str(first.job.id) in caught.value.message
    assert Job.objects.count() == 1
    assert OrmQ.objects.count() == 1


def test_the_same_key_from_two_owners_makes_two_jobs():
    alice = submit_job("demo.noop", {}, idempotency_key="shared", owner="alice")
    bob = submit_job("demo.noop", {}, idempotency_key="shared", owner="bob")

    assert alice.created and bob.created
    assert alice.job.id != bob.job.id
    assert Job.objects.count() == 2


def test_jobs_without_a_key_are_never_deduplicated():
    submit_job("demo.noop", {}, owner="alice")
    submit_job("demo.noop", {}, owner="alice")
    assert Job.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_submissions_racing_with_one_key_make_one_job():
    barrier = threading.Barrier(2)
    results = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            barrier.wait(timeout=5)
            results.append(submit_job("demo.sleep", {"seconds": 1}, idempotency_key="race", owner="alice"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert errors == []
    assert Job.objects.count() == 1
    job = Job.objects.get()
    assert [r.job.id for r in results] == [job.id, job.id]
    assert sorted(r.created for r in results) == [False, True]
    assert OrmQ.objects.count() == 1
    assert JobEvent.objects.count() == 1


# --- kinds only the engine submits ------------------------------------------------


@pytest.mark.parametrize("payload", [{"delivery": "8f0c6a3e-2d6a-4b8e-9d59-0e7f1b1c2a3d"}, {}, {"surprise": 1}, []])
def test_an_internal_kind_is_refused_naming_the_kind_whatever_the_payload(payload):
    error = refused("webhook.deliver", payload)

    assert [e["field"] for e in error.errors] == ["kind"]
    assert "'webhook.deliver' is internal: only the engine submits it" in error.message


def test_an_unknown_kind_does_not_name_the_internal_kinds():
    error = refused("demo.nope", {})
    assert "webhook.deliver" not in error.message and "demo.noop" in error.message


def test_the_engine_still_submits_internal_kinds():
    from jobs.engine.registry import get_handler

    assert get_handler("webhook.deliver").internal
    job = submit_job("webhook.deliver", {"delivery": "8f0c6a3e-2d6a-4b8e-9d59-0e7f1b1c2a3d"}, internal=True).job
    assert (job.kind, job.queue) == ("webhook.deliver", "webhooks")
