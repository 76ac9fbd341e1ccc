"""POST /api/v1/jobs through the ASGI application: the intake answers good
submissions with API keys itself (jobs/api/intake.py), exactly as Django
would, and leaves every other request to Django.

Called in-process through `config.asgi.application`, as Daphne calls it.
Transactional tests: the intake's writer thread and Django's request threads
use their own database connections.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from asgiref.testing import ApplicationCommunicator
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from django_q.models import OrmQ

from config import asgi
from config.asgi import application
from jobs.api import intake
from jobs.engine import submission
from jobs.models import Job, JobEvent
from tests.jobs.api.conftest import assert_problem

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/api/v1/jobs"


@pytest.fixture(autouse=True)
def _close_connections():
    """The intake's writer and Django's request threads keep their database
    connections; close them, or the test database could not be dropped."""
    yield
    asgi.intake.close()
    asgi.django_asgi_app.close()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    def __getitem__(self, name: str) -> str:
        return self.headers[name.lower()]

    def json(self) -> Any:
        return json.loads(self.content)


async def _call(body: bytes, headers: dict[str, str], path: str = PATH) -> Answer:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await communicator.receive_output(20)
    chunks = []
    while True:
        message = await communicator.receive_output(20)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers_out = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    return Answer(start["status"], headers_out, b"".join(chunks))


def post(key: str | None, body: Any, *, content_type: str = "application/json", **extra: str) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(_call(raw, _headers(key, raw, content_type, extra)))


def post_together(key: str, bodies: list[Any], **extra: str) -> list[Answer]:
    async def all_at_once() -> list[Answer]:
        raws = [json.dumps(body).encode() for body in bodies]
        return await asyncio.gather(*(_call(raw, _headers(key, raw, "application/json", extra)) for raw in raws))

    return asyncio.run(all_at_once())


def _headers(key: str | None, raw: bytes, content_type: str, extra: dict[str, str]) -> dict[str, str]:
    headers = {"Host": "testserver", "Content-Type": content_type, "Content-Length": str(len(raw))}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    headers.update({name.replace("_", "-"): value for name, value in extra.items()})
    return headers


@pytest.fixture
def django_only(monkeypatch):
    """Requests the intake answers would fail the test: Django must answer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the intake created jobs for a request Django should answer")

    monkeypatch.setattr(submission, "insert_jobs", refuse)


@pytest.fixture
def intake_calls(monkeypatch) -> list[int]:
    """How many jobs each of the intake's statements created."""
    calls: list[int] = []
    original = submission.insert_jobs

    def counted(jobs):
        calls.append(len(jobs))
        return original(jobs)

    monkeypatch.setattr(submission, "insert_jobs", counted)
    return calls


# --- what the intake answers itself ---------------------------------------------


def test_a_good_submission_is_created_by_the_intake(make_key, intake_calls):
    answer = post(make_key(), {"kind": "demo.noop", "payload": {}, "priority": 3})

    assert answer.status_code == 202, answer.content
    body = answer.json()
    assert answer["Location"] == f"{PATH}/{body['id']}"
    assert (body["state"], body["priority"], body["attempt_history"]) == ("queued", 3, [])
    job = Job.objects.get(id=body["id"])
    assert job.owner.startswith("apikey:") and job.priority == 3
    assert list(JobEvent.objects.filter(job=job).values_list("type", flat=True)) == ["job.created"]
    assert [row.task["args"] for row in OrmQ.objects.all()] == [(str(job.id),)]
    assert intake_calls == [1]


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "demo.noop", "payload": {}},
        {
            "kind": "demo.sleep",
            "payload": {"seconds": 1},
            "queue": "elsewhere",
            "priority": -7,
            "run_after": (timezone.now() + timedelta(days=30)).isoformat(),
            "max_attempts": 9,
            "backoff_base": 1.5,
            "backoff_max": 30,
            "callback_url": "https://client.example.com/done",
        },
    ],
)
def test_its_answer_is_the_one_django_gives(make_key, body):
    key = make_key()
    by_intake = post(key, body, Idempotency_Key="same-shape", X_Request_ID="req-1")
    job_id = by_intake.json()["id"]
    # Django's answer to the same request is its replay (the key is taken now).
    by_django = post(key, body, Idempotency_Key="same-shape", X_Request_ID="req-1")

    assert by_intake.status_code == 202 and by_django.status_code == 200
    assert by_intake.content == by_django.content
    assert by_django.headers.pop("idempotent-replayed") == "true"
    assert by_intake.headers == by_django.headers
    assert by_intake["X-Request-ID"] == "req-1"
    read = Client().get(f"{PATH}/{job_id}", headers={"Authorization": f"Bearer {key}"})
    assert read.content == by_intake.content


def test_concurrent_submissions_share_statements(make_key, intake_calls):
    answers = post_together(make_key(), [{"kind": "demo.sleep", "payload": {"seconds": i}} for i in range(40)])

    assert [a.status_code for a in answers] == [202] * 40
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 40 and Job.objects.filter(id__in=ids).count() == 40
    assert sorted(Job.objects.values_list("payload__seconds", flat=True)) == list(range(40))
    assert sum(intake_calls) == 40 and len(intake_calls) < 40


def test_two_concurrent_submissions_with_one_key_make_one_job(make_key):
    answers = post_together(make_key(), [{"kind": "demo.noop", "payload": {}}] * 2, Idempotency_Key="once")

    assert sorted(a.status_code for a in answers) == [200, 202]
    assert len({a.json()["id"] for a in answers}) == 1
    assert Job.objects.count() == 1


def test_a_reused_key_with_another_body_is_refused_by_django(make_key):
    key = make_key()
    assert post(key, {"kind": "demo.noop", "payload": {}}, Idempotency_Key="k").status_code == 202

    answer = post(key, {"kind": "demo.noop", "payload": {}, "priority": 1}, Idempotency_Key="k")

    assert_problem(answer, 422, "idempotency-key-reused")
    assert Job.objects.count() == 1


def test_when_the_insert_fails_django_answers_and_nothing_is_lost(make_key, monkeypatch):
    """Postgres refuses the group's statement (here a statement timeout while
    another session locks the table): it rolled back, so Django may create the job."""
    import psycopg
    from django.db import connection

    from tests.conftest import test_database_url

    original = submission.insert_jobs

    def times_out(jobs):
        with psycopg.connect(test_database_url()) as locker:
            locker.execute("LOCK TABLE jobs_job IN SHARE MODE")
            with connection.cursor() as cursor:
                cursor.execute("SET statement_timeout = '200ms'")
            try:
                return original(jobs)
            finally:
                with connection.cursor() as cursor:
                    cursor.execute("RESET statement_timeout")

    monkeypatch.setattr(submission, "insert_jobs", times_out)

    answer = post(make_key(), {"kind": "demo.noop", "payload": {}})

    assert answer.status_code == 202, answer.content
    assert Job.objects.filter(id=answer.json()["id"]).exists()
    assert Job.objects.count() == 1


# --- a submission committed is never created twice ------------------------------


@pytest.fixture
def cut_after_commit(monkeypatch):
    """The writer's group commits, then its connection is cut before the rows
    come back: Postgres terminates the session, as a restart or a network
    failure would."""
    from django.db import connection

    original = submission.insert_jobs

    def cut(jobs):
        created = original(jobs)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return created

    monkeypatch.setattr(submission, "insert_jobs", cut)


def test_a_connection_cut_after_the_commit_is_answered_503_not_created_again(make_key, cut_after_commit):
    answer = post(make_key(), {"kind": "demo.noop", "payload": {}}, X_Request_ID="req-cut")

    body = assert_problem(answer, 503, "unavailable")
    assert answer["Retry-After"] == "1"
    assert answer["X-Request-ID"] == "req-cut"
    assert "Idempotency-Key" in body["detail"]
    assert Job.objects.count() == 1
    assert OrmQ.objects.count() == 1


def test_with_an_idempotency_key_a_cut_after_the_commit_is_answered_by_replay(make_key, cut_after_commit):
    answer = post(make_key(), {"kind": "demo.noop", "payload": {}}, Idempotency_Key="cut")

    assert answer.status_code == 200, answer.content
    assert answer["Idempotent-Replayed"] == "true"
    assert Job.objects.get().id == UUID(answer.json()["id"])


def test_an_error_after_the_commit_is_answered_503_not_created_again(make_key, monkeypatch):
    original = submission.insert_jobs

    def fails_after_commit(jobs):
        original(jobs)
        raise RuntimeError("the rows could not be read back")

    monkeypatch.setattr(submission, "insert_jobs", fails_after_commit)

    answers = post_together(make_key(), [{"kind": "demo.noop", "payload": {}}] * 3)

    for answer in answers:
        assert_problem(answer, 503, "unavailable")
    assert Job.objects.count() == 3


def test_an_answer_that_cannot_be_built_is_a_problem_not_a_second_job(make_key, monkeypatch):
    def broken(job):
        raise RuntimeError("cannot render")

    monkeypatch.setattr(intake, "job_json", broken)
    key = make_key()

    assert_problem(post(key, {"kind": "demo.noop", "payload": {}}), 500, "internal-error")
    assert Job.objects.count() == 1
    # With an Idempotency-Key, Django answers: the replay of the job created.
    answer = post(key, {"kind": "demo.noop", "payload": {}}, Idempotency_Key="render")
    assert answer.status_code == 200, answer.content
    assert Job.objects.count() == 2
    assert Job.objects.filter(id=answer.json()["id"], idempotency_key="render").exists()


def test_a_database_error_before_the_insert_is_answered_by_django(make_key, monkeypatch):
    """Nothing was written: Django creates the job (the intake's key check fails)."""

    def down(keys):
        raise OperationalError("the server closed the connection unexpectedly")

    monkeypatch.setattr(intake, "verify_api_keys", down)

    answer = post(make_key(), {"kind": "demo.noop", "payload": {}})

    assert answer.status_code == 202
    assert Job.objects.filter(id=answer.json()["id"]).exists()
    assert Job.objects.count() == 1


# --- what it leaves to Django, which answers as always ------------------------------


@pytest.mark.parametrize(
    ("body", "extra", "status", "code"),
    [
        (b'{"kind": "demo.noop", "payload": ', {}, 400, "malformed-json"),
        ({"kind": "demo.nope", "payload": {}}, {}, 422, None),
        ({"kind": "webhook.deliver", "payload": {"delivery": "8f0c6a3e-2d6a-4b8e-9d59-0e7f1b1c2a3d"}}, {}, 422, None),
        ({"kind": "demo.sleep", "payload": {"seconds": "long"}}, {}, 422, None),
        ({"kind": "demo.noop", "payload": {}, "surprise": 1}, {}, 422, None),
        ({"kind": "demo.noop", "payload": {}}, {"Idempotency_Key": "k" * 256}, 400, "invalid-idempotency-key"),
        ({"kind": "demo.noop", "payload": {"text": "nul \u0000"}}, {}, 422, None),
        (b'{"kind": "demo.noop", "payload": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, {}, 400, "malformed-json"),
        (b'{"kind": "demo.noop", "payload": ' + b'{"a":' * 100 + b"1" + b"}" * 101, {}, 422, None),
    ],
)
def test_a_bad_body_is_answered_by_django(make_key, django_only, body, extra, status, code):
    assert_problem(post(make_key(), body, **extra), status, code)
    assert Job.objects.count() == 0


def test_a_body_of_another_media_type_is_answered_by_django(make_key, django_only):
    assert_problem(post(make_key(), b"kind=demo.noop", content_type="text/plain"), 415, "unsupported-media-type")


def test_a_body_over_one_mib_is_answered_by_django(make_key, django_only):
    body = {"kind": "demo.noop", "payload": {"text": "x" * (1024 * 1024)}}
    assert_problem(post(make_key(), body), 413, "request-too-large")


def test_an_unknown_or_revoked_key_is_answered_by_django(make_key):
    from jobs.engine.apikeys import revoke_api_key

    revoked = make_key()
    revoke_api_key(revoked)

    for key in (revoked, "cvk_" + "x" * 40, "not-a-key"):
        answer = post(key, {"kind": "demo.noop", "payload": {}})
        assert_problem(answer, 401, "not-authenticated")
    assert Job.objects.count() == 0


def test_a_key_without_the_submit_scope_is_answered_by_django(make_key):
    assert_problem(post(make_key(scopes=("read",)), {"kind": "demo.noop", "payload": {}}), 403, "forbidden")
    assert Job.objects.count() == 0


def test_a_request_without_a_key_is_answered_by_django(django_only):
    assert_problem(post(None, {"kind": "demo.noop", "payload": {}}), 401)


def test_a_host_django_does_not_serve_is_answered_by_django(make_key, django_only):
    raw = json.dumps({"kind": "demo.noop", "payload": {}}).encode()
    headers = {**_headers(make_key(), raw, "application/json", {}), "Host": "evil.example.com"}

    assert asyncio.run(_call(raw, headers)).status_code == 400


@pytest.fixture
def secure_settings(settings):
    """`settings`, with Django's middleware built anew from them (it reads them once)."""

    class Changed:
        def __setattr__(self, name, value):
            setattr(settings, name, value)
            asgi.django_asgi_app.load_middleware()

    yield Changed()
    settings._finalize()
    asgi.django_asgi_app.load_middleware()


def test_plain_http_is_redirected_by_django_where_https_is_required(make_key, django_only, secure_settings):
    secure_settings.SECURE_SSL_REDIRECT = True

    assert post(make_key(), {"kind": "demo.noop", "payload": {}}).status_code == 301


def test_over_https_it_sends_the_hsts_header_django_sends(make_key, secure_settings):
    secure_settings.SECURE_HSTS_SECONDS = 3600
    secure_settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    secure_settings.SECURE_HSTS_PRELOAD = False
    secure_settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    key = make_key()
    body = {"kind": "demo.noop", "payload": {}}

    by_intake = post(key, body, X_Forwarded_Proto="https", Idempotency_Key="hsts")
    by_django = post(key, body, X_Forwarded_Proto="https", Idempotency_Key="hsts")

    assert by_intake.status_code == 202 and by_django.status_code == 200
    assert by_intake["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"
    assert by_intake["Strict-Transport-Security"] == by_django["Strict-Transport-Security"]


def test_the_job_json_is_django_ninjas_rendering_of_job_detail_out(make_key):
    """`intake.job_json` skips django-ninja's validation of `job_detail_out`: the
    bytes must still be what django-ninja renders, for a job with every field set."""
    from jobs.api.app import api
    from jobs.api.schemas import JobDetailOut
    from jobs.api.views import job_detail_out

    run_after = (timezone.now() + timedelta(days=3)).isoformat()
    post(make_key(), {"kind": "demo.sleep", "payload": {"seconds": 1}, "run_after": run_after})
    job = Job.objects.get()
    Job.objects.filter(id=job.id).update(
        state="dead",
        attempts=2,
        progress_percent=40,
        progress_message="half",
        result={"a": [1, 2.5, None]},
        error_type="Boom",
        error_message="it broke",
        prompt_tokens=5,
        completion_tokens=7,
    )
    job.refresh_from_db()

    rendered = api.renderer.render(
        None, JobDetailOut.model_validate(job_detail_out(job, attempts=[])).model_dump(), response_status=202
    )
    assert intake.job_json(job) == rendered.encode()
