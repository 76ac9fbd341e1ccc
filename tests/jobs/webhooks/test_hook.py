"""The hook in jobs.engine.states.transition: messages are created with the state
change that causes them, once, and cost nothing when there are none."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import connection, transaction

from jobs import services
from jobs.engine.states import transition
from jobs.models import Job, State, WebhookDelivery
from jobs.webhooks import endpoints, messages
from tests.conftest import wait_until
from tests.jobs.api.conftest import ApiClient
from tests.jobs.webhooks.conftest import deliveries_of, finish, operator_owner

PUBLIC = "https://hooks.example.com/in"


@pytest.fixture
def endpoint(db, monkeypatch):
    """`endpoint(*event_types)`: a registered endpoint at a public URL."""
    monkeypatch.setattr(
        endpoints.ssrf, "resolve", lambda host, port: [endpoints.ssrf.ipaddress.ip_address("93.184.215.14")]
    )

    def make(*event_types: str, owner: str | None = None, url: str = PUBLIC):
        owner = operator_owner() if owner is None else owner
        return services.create_endpoint(owner=owner, url=url, event_types=list(event_types)).endpoint

    return make


@pytest.mark.django_db(transaction=True)
def test_a_job_that_asks_for_no_message_finishes_in_one_statement(make_job, django_assert_num_queries):
    job = make_job()
    transition(job.id, target=State.RUNNING)
    messages.subscribed_event_types()  # warm the per-second cache
    assert not connection.in_atomic_block
    with django_assert_num_queries(1):
        assert transition(job.id, target=State.SUCCEEDED) is not None
    assert not WebhookDelivery.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_batch_job_whose_batch_has_no_callback_finishes_in_one_statement(db, django_assert_num_queries):
    batch = services.submit_batch("b", [{"kind": "demo.noop", "payload": {}}]).batch
    job = batch.jobs.get()
    transition(job.id, target=State.RUNNING)
    messages.subscribed_event_types()
    with django_assert_num_queries(1):
        assert transition(job.id, target=State.SUCCEEDED) is not None


@pytest.mark.django_db(transaction=True)
def test_a_finished_job_with_a_callback_url_gets_one_message_and_one_delivery_job(make_key, make_job):
    key = make_key()
    api = ApiClient(key)
    submitted = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "callback_url": PUBLIC}).json()
    job = finish(Job.objects.get(id=submitted["id"]), result={"ok": True})

    (delivery,) = deliveries_of(job)
    assert delivery.url == PUBLIC and delivery.endpoint is None
    assert delivery.event_type == "job.succeeded"
    assert delivery.message_id.startswith("msg_")
    assert delivery.signing_owner == job.owner and job.owner.startswith("apikey:")
    message = json.loads(delivery.body)
    assert set(message) == {"type", "timestamp", "data"}
    assert message["type"] == "job.succeeded"
    # The job exactly as the API lists it (GET /jobs/{id} adds the attempts' text and logs).
    (listed,) = [item for item in api.get("/jobs").json()["items"] if item["id"] == str(job.id)]
    assert message["data"] == listed

    deliver_job = delivery.deliver_job
    assert (deliver_job.kind, deliver_job.queue, deliver_job.state) == ("webhook.deliver", "webhooks", "queued")
    assert deliver_job.payload == {"delivery": str(delivery.id)}
    assert deliver_job.max_attempts == 8


@pytest.mark.parametrize(("target", "event_type"), [(State.DEAD, "job.dead"), (State.CANCELLED, "job.cancelled")])
def test_dead_and_cancelled_jobs_send_their_event_types(make_job, target, event_type):
    job = finish(make_job(callback_url=PUBLIC), target)
    assert [d.event_type for d in deliveries_of(job)] == [event_type]


def test_a_job_is_sent_to_the_endpoints_subscribed_to_its_event_type(make_job, endpoint):
    succeeded = endpoint("job.succeeded", url="https://a.example.com/")
    endpoint("job.dead", url="https://b.example.com/")
    both = endpoint("job.succeeded", "job.dead", url="https://c.example.com/")
    job = finish(make_job(callback_url=PUBLIC))
    deliveries = deliveries_of(job)
    assert sorted(d.url for d in deliveries) == sorted([PUBLIC, succeeded.url, both.url])
    assert len({d.message_id for d in deliveries}) == 3
    assert len({d.body for d in deliveries}) == 1  # one message, signed per target


def test_disabled_endpoints_get_nothing(make_job, endpoint):
    hook = endpoint("job.succeeded")
    services.disable_endpoint(hook.id)
    assert deliveries_of(finish(make_job())) == []


def test_delivery_jobs_send_no_messages_about_themselves(make_job, endpoint):
    endpoint("job.succeeded", "job.dead", "job.cancelled")
    job = finish(make_job())
    (delivery,) = deliveries_of(job)
    finish(delivery.deliver_job, State.DEAD)
    assert WebhookDelivery.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_messages_commit_or_roll_back_with_the_state_change(make_job):
    job = make_job(callback_url=PUBLIC)
    transition(job.id, target=State.RUNNING)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert transition(job.id, target=State.SUCCEEDED) is not None
        assert WebhookDelivery.objects.count() == 1
        raise RuntimeError("the caller's transaction fails")
    job.refresh_from_db()
    assert job.state == State.RUNNING
    assert not WebhookDelivery.objects.exists()
    assert not Job.objects.filter(kind="webhook.deliver").exists()


@pytest.mark.django_db(transaction=True)
def test_a_transition_another_actor_won_sends_nothing(make_job):
    job = make_job(callback_url=PUBLIC)
    transition(job.id, target=State.RUNNING)
    assert transition(job.id, target=State.SUCCEEDED) is not None
    assert transition(job.id, target=State.DEAD) is None
    assert transition(job.id, target=State.CANCELLED) is None
    assert WebhookDelivery.objects.count() == 1


# --- batch.completed ---------------------------------------------------------


def _batch(n: int, *, callback_url: str = PUBLIC, owner: str = ""):
    jobs = [{"kind": "demo.noop", "payload": {}} for _ in range(n)]
    return services.submit_batch("b", jobs, callback_url=callback_url, owner=owner).batch


def test_batch_completed_is_sent_once_when_its_last_job_finishes(db):
    batch = _batch(3)
    first, second, third = batch.jobs.order_by("id")
    finish(first)
    finish(second, State.DEAD)
    assert not WebhookDelivery.objects.filter(batch=batch).exists()
    finish(third, State.CANCELLED)
    (delivery,) = WebhookDelivery.objects.filter(batch=batch)
    message = json.loads(delivery.body)
    assert message["type"] == "batch.completed"
    assert message["data"]["id"] == str(batch.id)
    assert message["data"]["done"] is True
    assert message["data"]["counts"]["succeeded"] == 1
    assert message["data"]["counts"]["dead"] == 1
    assert message["data"]["counts"]["cancelled"] == 1


def test_endpoints_subscribed_to_batch_completed_get_it_without_a_callback(db, endpoint):
    hook = endpoint("batch.completed")
    batch = _batch(1, callback_url="")
    finish(batch.jobs.get())
    (delivery,) = WebhookDelivery.objects.filter(batch=batch)
    assert delivery.endpoint == hook


@pytest.mark.django_db(transaction=True)
def test_the_last_two_jobs_finishing_at_once_send_one_batch_completed(db):
    """Each sees the other still running unless the batch row lock orders them."""
    batch = _batch(2)
    first, second = batch.jobs.order_by("id")
    for job in (first, second):
        transition(job.id, target=State.RUNNING)
    first_checked = threading.Event()
    second_done = threading.Event()
    errors: list[BaseException] = []
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (second_pid,) = cursor.fetchone()

    def second_waits_on_first_or_is_done() -> bool:
        if second_done.is_set():
            return True
        with connection.cursor() as cursor:  # pg_blocking_pids reads the live lock table
            cursor.execute("SELECT pg_backend_pid() = ANY(pg_blocking_pids(%s))", [second_pid])
            return cursor.fetchone()[0]

    def finish_first() -> None:
        try:
            with transaction.atomic():
                transition(first.id, target=State.SUCCEEDED)
                first_checked.set()
                # Commit late: once the second job's finish waits on this
                # transaction's locks or, were nothing to order them, is done.
                wait_until(second_waits_on_first_or_is_done, timeout=10, interval=0.02, message="the second finish")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=finish_first)
    thread.start()
    assert first_checked.wait(10)
    transition(second.id, target=State.SUCCEEDED)
    second_done.set()
    thread.join(10)
    assert not errors
    assert WebhookDelivery.objects.filter(batch=batch, event_type="batch.completed").count() == 1


def test_the_active_jobs_of_a_batch_have_a_partial_index(db):
    # Which index the planner picks on a near-empty table is its own business;
    # what matters is that the batch.completed check has one to use.
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'job_active_by_batch'")
        (definition,) = cursor.fetchone()
    assert "(batch_id)" in definition
    for state in ("queued", "scheduled", "running", "retrying"):
        assert state in definition
