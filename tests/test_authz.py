"""The authorization matrix: every caller against every dashboard page and
action, every API operation and both SSE streams.

The routes are enumerated from the URL resolver, django-ninja's routers and
the SSE routing, so a new endpoint that is not listed here fails the test
until someone decides who may call it.

Callers: anonymous, a signed-in reader (no permission), an operator (staff +
jobs.operate_job), API keys with a single scope each, and a revoked key.
"""

from __future__ import annotations

import re
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from dashboard.routing import http_urlpatterns as sse_patterns
from jobs.api.app import api
from jobs.engine.apikeys import create_api_key, revoke_api_key
from jobs.models import Job, Schedule, State, WebhookEndpoint
from tests.dashboard.conftest import SSEClient, running_hub, session_cookie
from tests.jobs.api.conftest import make_dead

ANONYMOUS, READER, OPERATOR = "anonymous", "reader", "operator"
KEY_SUBMIT, KEY_READ, KEY_OPERATE, KEY_REVOKED = "key:submit", "key:read", "key:operate", "key:revoked"
ROLES = (ANONYMOUS, READER, OPERATOR, KEY_SUBMIT, KEY_READ, KEY_OPERATE, KEY_REVOKED)
SESSION_PERMISSIONS = {READER: set(), OPERATOR: {"read", "operate"}}
KEY_SCOPES = {KEY_SUBMIT: {"submit"}, KEY_READ: {"read"}, KEY_OPERATE: {"operate"}}

# --- what each route needs ------------------------------------------------------

# Dashboard routes by URL name: the methods they answer and what they need.
# "page": any signed-in user; "operate": staff with jobs.operate_job;
# "submit": jobs.add_job or an operator; "staff": a staff user (the workers
# page names every tenant's running jobs).
DASHBOARD = {
    "overview": {"GET": "page"},
    "jobs": {"GET": "page"},
    "job": {"GET": "page"},
    "cancel-job": {"POST": "operate"},
    "retry-job": {"POST": "operate"},
    "dead-letter": {"GET": "page"},
    "dead-letter-retry": {"POST": "operate"},
    "dead-letter-discard": {"POST": "operate"},
    "submit": {"GET": "page", "POST": "submit"},
    "batches": {"GET": "page"},
    "batch": {"GET": "page"},
    "batch-budget": {"POST": "operate"},
    "batch-retry": {"POST": "operate"},
    "batch-content": {"GET": "page"},
    "batch-page": {"GET": "page"},
    "batch-export": {"GET": "page"},
    "content-new": {"GET": "page", "POST": "submit"},
    "content-preview": {"POST": "page"},  # renders a preview, creates nothing
    "webhooks": {"GET": "page", "POST": "operate"},
    "webhook": {"GET": "page"},
    "webhook-rotate": {"POST": "operate"},
    "webhook-enable": {"POST": "operate"},
    "webhook-disable": {"POST": "operate"},
    "webhook-delivery": {"GET": "page"},
    "webhook-redeliver": {"POST": "operate"},
    "workers": {"GET": "staff"},
    "charts": {"GET": "page"},  # counts and run times per kind, no job ids
    "schedules": {"GET": "page", "POST": "operate"},
    "schedule-preview": {"GET": "page"},
    "schedule-rows": {"GET": "page"},
    "schedule": {"GET": "page", "POST": "operate"},
    "schedule-run": {"POST": "operate"},
    "schedule-enable": {"POST": "operate"},
    "schedule-disable": {"POST": "operate"},
    "schedule-delete": {"POST": "operate"},  # after the others: it removes the schedule they name
    "jobs-cancel": {"POST": "operate"},
    "jobs-retry": {"POST": "operate"},
    "run-now": {"POST": "operate"},
    "queue-pause": {"POST": "operate"},
    "queue-resume": {"POST": "operate"},
    "queue-limit": {"POST": "operate"},
    "batch-cancel": {"POST": "operate"},
    "api-keys": {"GET": "staff", "POST": "staff"},
    "api-key-revoke": {"POST": "staff"},
    "webhook-delete": {"POST": "operate"},  # last: it removes the endpoint the others name
}
# Routes the matrix calls with a made-up id or slug: an allowed caller gets 404.
DASHBOARD_MADE_UP = {"batch-page", "webhook-delivery", "webhook-redeliver", "api-key-revoke"}

# API operations (method, path as django-ninja declares it) and their scope;
# None: public.
API = {
    ("POST", "/jobs"): "submit",
    ("GET", "/jobs"): "read",
    ("GET", "/jobs/{job_id}"): "read",
    ("GET", "/jobs/{job_id}/events"): "read",
    ("POST", "/jobs/{job_id}/cancel"): "operate",
    ("POST", "/jobs/{job_id}/retry"): "operate",
    ("GET", "/dlq"): "read",
    ("POST", "/dlq/retry"): "operate",
    ("POST", "/dlq/discard"): "operate",
    ("GET", "/queues"): "read",
    ("POST", "/queues/{queue}/pause"): "operate",
    ("POST", "/queues/{queue}/resume"): "operate",
    ("PATCH", "/queues/{queue}"): "operate",
    ("POST", "/jobs/cancel"): "operate",
    ("POST", "/jobs/retry"): "operate",
    ("POST", "/jobs/{job_id}/run-now"): "operate",
    ("POST", "/batches/{batch_id}/cancel"): "operate",
    ("POST", "/batches"): "submit",
    ("GET", "/batches"): "read",
    ("GET", "/batches/{batch_id}"): "read",
    ("PATCH", "/batches/{batch_id}"): "operate",
    ("POST", "/batches/content"): "submit",
    ("POST", "/batches/content/preview"): "submit",
    ("GET", "/batches/{batch_id}/pages"): "read",
    ("GET", "/batches/{batch_id}/pages/{slug}"): "read",
    ("GET", "/usage"): "read",
    ("GET", "/problems/{code}"): None,
    ("GET", "/webhooks/default/secret"): "submit",
    ("POST", "/webhooks/default/rotate"): "submit",
    ("POST", "/webhooks"): "submit",
    ("GET", "/webhooks"): "read",
    ("GET", "/webhooks/{uuidstr:endpoint_id}"): "read",
    ("DELETE", "/webhooks/{uuidstr:endpoint_id}"): "submit",
    ("POST", "/webhooks/{uuidstr:endpoint_id}/rotate"): "submit",
    ("POST", "/webhooks/{uuidstr:endpoint_id}/disable"): "submit",
    ("POST", "/webhooks/{uuidstr:endpoint_id}/enable"): "submit",
    ("GET", "/webhooks/{uuidstr:endpoint_id}/deliveries"): "read",
    ("GET", "/jobs/{job_id}/deliveries"): "read",
    ("POST", "/jobs/{job_id}/deliveries/{delivery_id}/redeliver"): "operate",
    ("GET", "/batches/{batch_id}/deliveries"): "read",
    ("POST", "/batches/{batch_id}/deliveries/{delivery_id}/redeliver"): "operate",
    ("GET", "/schedules"): "read",
    ("POST", "/schedules"): "operate",
    ("GET", "/schedules/{name}"): "read",
    ("PATCH", "/schedules/{name}"): "operate",
    ("DELETE", "/schedules/{name}"): "operate",
    ("POST", "/schedules/{name}/run"): "operate",
}
# django-ninja's own views: the OpenAPI document and its viewer are public.
API_DOCS = {"openapi-json": "/api/v1/openapi.json", "openapi-view": "/api/v1/docs"}
# Session users' permissions per scope (jobs/api/auth.py).
SESSION_SCOPE = {"read": {READER, OPERATOR}, "submit": set(), "operate": {OPERATOR}}

SSE = {
    "events/overview": "dashboard",
    "events/jobs": "dashboard",
    "events/jobs/<uuid:job_id>": "dashboard",
    "events/dead-letter": "dashboard",
    "events/batches": "dashboard",
    "events/batches/<uuid:batch_id>": "dashboard",
    "api/v1/events": "api",
}

# Bodies that pass validation, so an allowed caller reaches the operation.
API_BODIES = {
    ("POST", "/jobs"): {"kind": "demo.noop", "payload": {}},
    ("POST", "/batches"): {"name": "b", "jobs": [{"kind": "demo.noop", "payload": {}}]},
    ("POST", "/dlq/retry"): {"ids": []},
    ("POST", "/dlq/discard"): {"ids": []},
    ("PATCH", "/queues/{queue}"): {"max_running": 3},
    ("POST", "/jobs/cancel"): {"ids": []},
    ("POST", "/jobs/retry"): {"filter": {"kind": "demo.noop"}},
    ("POST", "/webhooks"): {"url": "http://127.0.0.1:9/other-hook", "event_types": ["job.dead"]},
    ("POST", "/schedules"): {"name": "made-by-the-matrix", "kind": "demo.noop", "cron": "@daily"},
}
HOOK_URL = "http://127.0.0.1:9/hook"

# --- the callers -------------------------------------------------------------------


class Callers:
    """One Client per role, with CSRF enforced, and what each of them owns."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.keys: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        reader = User.objects.create_user("rick", password="pw")
        operator = User.objects.create_user("olga", password="pw", is_staff=True)
        operator.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
        self.users = {READER: reader, OPERATOR: User.objects.get(pk=operator.pk)}
        for role, scopes in KEY_SCOPES.items():
            created = create_api_key(role, scopes=scopes)
            self.keys[role] = created.key
            self.owners[role] = created.api_key.owner
        revoked = create_api_key("revoked", scopes=["submit", "read", "operate"])
        revoke_api_key(revoked.key)
        self.keys[KEY_REVOKED] = revoked.key
        self.owners[KEY_REVOKED] = revoked.api_key.owner
        for role, user in self.users.items():
            self.owners[role] = f"user:{user.pk}"

    def client(self, role: str) -> tuple[Client, dict[str, str]]:
        """A CSRF-enforcing client and the headers the role sends (its key, the
        CSRF token of its session)."""
        client = Client(enforce_csrf_checks=True)
        headers: dict[str, str] = {}
        if role in self.users:
            client.force_login(self.users[role])
        if role in self.keys:
            headers["Authorization"] = f"Bearer {self.keys[role]}"
        client.get("/accounts/login/")  # sets the csrftoken cookie
        headers["X-CSRFToken"] = client.cookies["csrftoken"].value
        return client, headers


def _objects(owner: str) -> dict[str, str]:
    """A dead job, a batch, a webhook endpoint and a schedule of `owner`: what
    the path parameters name, so that a caller who may act reaches the operation."""
    from jobs.services import create_endpoint, create_schedule, submit_batch, submit_job

    job = submit_job("demo.noop", {}, owner=owner).job
    make_dead(job.id)
    batch = submit_batch("mine", [{"kind": "demo.noop", "payload": {}}], owner=owner).batch
    endpoint = WebhookEndpoint.objects.filter(owner=owner).first()
    if endpoint is None:
        endpoint = create_endpoint(owner=owner, url=HOOK_URL, event_types=["job.dead"]).endpoint
    schedule = Schedule.objects.filter(owner=owner).first()
    if schedule is None:
        name = "of-" + re.sub(r"[^A-Za-z0-9_.:-]", "-", owner)
        schedule = create_schedule(owner=owner, name=name, kind="demo.noop", cron="@daily")
    return {
        "name": schedule.name,
        "job_id": str(job.id),
        "batch_id": str(batch.id),
        "endpoint_id": str(endpoint.id),
        "delivery_id": str(uuid.uuid4()),
        "slug": "no-such-page",
        "code": "not-found",
        "queue": "authz-queue",
    }


@pytest.fixture(autouse=True)
def _private_webhooks(settings):
    """Endpoints on a loopback address (nothing is delivered: no worker runs),
    forgotten by this process after each test as they are rolled back."""
    from jobs.webhooks import messages

    settings.CONVEYOR_WEBHOOKS = {**settings.CONVEYOR_WEBHOOKS, "ALLOW_PRIVATE": True}
    messages.forget_subscriptions()
    yield
    messages.forget_subscriptions()


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(?:\w+:)?(\w+)\}", lambda m: values[m.group(1)], path)


# --- enumeration: nothing goes unlisted --------------------------------------------


def _api_operations() -> set[tuple[str, str]]:
    found = set()
    for _prefix, router in api._routers:
        for path, path_view in router.path_operations.items():
            for operation in path_view.operations:
                for method in operation.methods:
                    found.add((method, path))
    return found


def _dashboard_names() -> set[str]:
    resolver = get_resolver()
    (dashboard,) = [p for p in resolver.url_patterns if isinstance(p, URLResolver) and p.namespace == "dashboard"]
    return {p.name for p in dashboard.url_patterns if isinstance(p, URLPattern)}


def test_every_api_operation_is_in_the_matrix():
    assert _api_operations() == set(API), "list every API operation (and its scope) in API"


def test_every_api_operation_requires_the_scope_the_matrix_says():
    for _prefix, router in api._routers:
        for path, path_view in router.path_operations.items():
            for operation in path_view.operations:
                scopes = {getattr(a, "scope", None) for a in operation.auth_callbacks or []}
                for method in operation.methods:
                    expected = API[(method, path)]
                    assert scopes == ({expected} if expected else set()), (method, path)


def test_every_dashboard_route_is_in_the_matrix():
    assert _dashboard_names() == set(DASHBOARD), "list every dashboard route (and what it needs) in DASHBOARD"


def test_every_sse_route_is_in_the_matrix():
    assert {str(p.pattern) for p in sse_patterns} == set(SSE)


def test_the_api_urls_are_the_operations_and_the_docs():
    from jobs.api.urls import _v1_patterns

    names = {p.name for p in _v1_patterns}
    assert names == {
        op.view_func.__name__ for _, r in api._routers for pv in r.path_operations.values() for op in pv.operations
    } | set(API_DOCS) | {"api-root"}


# --- the matrix: dashboard ----------------------------------------------------------

COUNTS = {"dashboard": 0, "api": 0, "sse": 0}


def _dashboard_url(name: str, objects: dict[str, str]) -> str:
    from django.urls import reverse

    kwargs = {}
    if name in ("queue-pause", "queue-resume", "queue-limit"):
        kwargs = {"queue": "authz-queue"}
    elif name == "api-key-revoke":
        kwargs = {"key_id": objects.get("key_id", 987654321)}
    elif name in ("job", "cancel-job", "retry-job", "run-now"):
        kwargs = {"job_id": objects["job_id"]}
    elif name in ("batch", "batch-budget", "batch-retry", "batch-content", "batch-cancel"):
        kwargs = {"batch_id": objects["batch_id"]}
    elif name == "batch-page":
        kwargs = {"batch_id": objects["batch_id"], "slug": objects["slug"]}
    elif name == "batch-export":
        kwargs = {"batch_id": objects["batch_id"], "fmt": "csv"}
    elif name.startswith("webhook-") and name not in DASHBOARD_MADE_UP:
        kwargs = {"endpoint_id": objects["endpoint_id"]}
    elif name in ("webhook-delivery", "webhook-redeliver"):
        kwargs = {"delivery_id": objects["delivery_id"]}
    elif name == "webhook":
        kwargs = {"endpoint_id": objects["endpoint_id"]}
    elif name == "schedule" or (name.startswith("schedule-") and name not in ("schedule-preview", "schedule-rows")):
        kwargs = {"name": objects["name"]}
    url = reverse(f"dashboard:{name}", kwargs=kwargs)
    return url + ("?kind=demo.noop" if name == "submit" else "")


def _dashboard_expected(role: str, needs: str) -> str:
    if role not in SESSION_PERMISSIONS:
        return "login"  # keys do not open the dashboard: it is sessions only
    if needs == "page":
        return "allowed"
    if needs == "operate":
        return "allowed" if role == OPERATOR else "forbidden"
    if needs in ("submit", "staff"):
        return "allowed" if role == OPERATOR else "forbidden"
    if needs == "staff":  # the operator is staff, the reader is not
        return "allowed" if role == OPERATOR else "forbidden"
    raise AssertionError(needs)


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
def test_the_dashboard_answers_each_caller_as_the_matrix_says(role):
    callers = Callers()
    objects = _objects(callers.owners.get(role, "someone-else"))
    client, headers = callers.client(role)
    failures = []
    for name, methods in DASHBOARD.items():
        for method, needs in methods.items():
            url = _dashboard_url(name, objects)
            # (A batch's retry without a job retries all its failed jobs; the
            # dead job named here is not in the batch.)
            data = {"job": objects["job_id"], "kind": "demo.noop"} if method == "POST" and name != "batch-retry" else {}
            response = client.generic(method, url, _encode(data), content_type=_FORM, headers=headers)
            expected = _dashboard_expected(role, needs)
            # Allowed: past the permission check. A POST of this placeholder
            # form may be refused as invalid (422), a made-up id is not found.
            answers = (
                {200, 302} | ({422} if method == "POST" else set()) | ({404} if name in DASHBOARD_MADE_UP else set())
            )
            ok = {
                "login": response.status_code == 302 and response["Location"].startswith("/accounts/login/"),
                "forbidden": response.status_code == 403,
                "allowed": response.status_code in answers and "/accounts/login/" not in response.get("Location", ""),
            }[expected]
            COUNTS["dashboard"] += 1
            if not ok:
                failures.append((method, url, expected, response.status_code))
    assert not failures, failures


_FORM = "application/x-www-form-urlencoded"


def _encode(data: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(data)


@pytest.mark.django_db
def test_every_dashboard_post_needs_the_csrf_token():
    callers = Callers()
    objects = _objects(callers.owners[OPERATOR])
    client, _headers = callers.client(OPERATOR)
    posts = [name for name, methods in DASHBOARD.items() if "POST" in methods]
    assert posts
    for name in posts:
        url = _dashboard_url(name, objects)
        response = client.post(url, {"job": objects["job_id"], "kind": "demo.noop"})
        assert response.status_code == 403, url
        assert b"CSRF" in response.content, url
    # Nothing happened: the dead job is still dead, and no job was submitted.
    assert Job.objects.get(id=objects["job_id"]).state == State.DEAD
    assert Job.objects.filter(kind="demo.noop").count() == 2  # the job and the batch's


@pytest.mark.django_db
def test_a_read_only_user_changes_nothing_from_the_dashboard():
    callers = Callers()
    objects = _objects(callers.owners[READER])
    client, headers = callers.client(READER)
    before = Job.objects.count()
    for name in ("retry-job", "dead-letter-retry", "dead-letter-discard", "submit"):
        url = _dashboard_url(name, objects)
        response = client.post(url, {"job": objects["job_id"], "kind": "demo.noop"}, headers=headers)
        assert response.status_code == 403, url
    assert Job.objects.get(id=objects["job_id"]).state == State.DEAD
    assert Job.objects.count() == before


# --- the matrix: API ----------------------------------------------------------------


def _api_expected(role: str, scope: str | None) -> str:
    if scope is None:
        return "allowed"
    if role in (ANONYMOUS, KEY_REVOKED):
        return "unauthenticated"
    if role in KEY_SCOPES:
        return "allowed" if scope in KEY_SCOPES[role] else "forbidden"
    return "allowed" if role in SESSION_SCOPE[scope] else "forbidden"


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
def test_the_api_answers_each_caller_as_the_matrix_says(role):
    import json

    callers = Callers()
    failures = []
    for (method, path), scope in API.items():
        # Fresh objects per operation: an earlier one may have deleted them.
        objects = _objects(callers.owners.get(role, "someone-else"))
        client, headers = callers.client(role)
        body = API_BODIES.get((method, path))
        kwargs = {"data": json.dumps(body), "content_type": "application/json"} if body is not None else {}
        response = client.generic(method, "/api/v1" + _fill(path, objects), headers=headers, **kwargs)
        expected = _api_expected(role, scope)
        status = response.status_code
        ok = {
            "unauthenticated": status == 401,
            "forbidden": status == 403,
            # Past authentication and authorization; 404 for the made-up
            # delivery ids, and never a server error.
            "allowed": status < 500 and status not in (401, 403),
        }[expected]
        if status in (401, 403):
            ok = ok and response["Content-Type"] == "application/problem+json"
        COUNTS["api"] += 1
        if not ok:
            failures.append((method, path, expected, status, response.content[:200]))
    for name, url in API_DOCS.items():
        client, headers = callers.client(role)
        COUNTS["api"] += 1
        if client.get(url, headers=headers).status_code != 200:
            failures.append(("GET", name, "allowed"))
    assert not failures, failures


@pytest.mark.django_db
@pytest.mark.parametrize("role", [KEY_READ, READER, OPERATOR, KEY_SUBMIT])
def test_allowed_reads_and_actions_succeed_for_the_callers_own_objects(role):
    """The "allowed" cells above with exact answers, where the objects exist."""
    callers = Callers()
    objects = _objects(callers.owners[role])
    client, headers = callers.client(role)
    if role == KEY_SUBMIT:
        response = client.post(
            "/api/v1/jobs", {"kind": "demo.noop", "payload": {}}, "application/json", headers=headers
        )
        assert response.status_code == 202
        return
    for path in ("/jobs/{job_id}", "/jobs/{job_id}/events", "/batches/{batch_id}", "/jobs", "/dlq", "/batches"):
        assert client.get("/api/v1" + _fill(path, objects), headers=headers).status_code == 200, path
    if role == OPERATOR:
        response = client.post("/api/v1" + _fill("/jobs/{job_id}/retry", objects), headers=headers)
        assert response.status_code == 202
        assert Job.objects.get(id=objects["job_id"]).state == State.QUEUED


# --- the matrix: SSE ----------------------------------------------------------------


def _sse_expected(role: str, kind: str) -> int:
    if role in (ANONYMOUS, KEY_REVOKED):
        return 401
    if kind == "dashboard":
        # Sessions only: a key is no dashboard login.
        return 200 if role in SESSION_PERMISSIONS else 401
    if role in KEY_SCOPES:
        return 200 if "read" in KEY_SCOPES[role] else 403
    return 200


def _sse_setup():
    callers = Callers()
    cookies = {role: session_cookie(user) for role, user in callers.users.items()}
    objects = {role: _objects(callers.owners.get(role, "someone-else")) for role in ROLES}
    return callers, cookies, objects


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_the_sse_streams_answer_each_caller_as_the_matrix_says():
    callers, cookies, objects = await sync_to_async(_sse_setup)()
    failures = []
    async with running_hub():
        for pattern, kind in SSE.items():
            for role in ROLES:
                path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m, r=role: objects[r][m.group(1)], pattern)
                headers = []
                if role in callers.keys:
                    headers.append((b"authorization", f"Bearer {callers.keys[role]}".encode()))
                client = await SSEClient(path, cookie=cookies.get(role), headers=headers).open()
                try:
                    expected = _sse_expected(role, kind)
                    if client.status != expected:
                        failures.append((path, role, expected, client.status))
                    if expected == 200:
                        assert client.headers[b"content-type"].startswith(b"text/event-stream")
                finally:
                    await client.close()
                COUNTS["sse"] += 1
    assert not failures, failures
    assert COUNTS["sse"] == len(SSE) * len(ROLES)


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- a second tenant ------------------------------------------------------------------

# Keys besides the matrix's single-scope ones: a tenant's everyday key and an
# operator's key that may read too.
KEY_TENANT, KEY_OPERATOR = "key:tenant", "key:operator"
SECOND_TENANT_KEYS = {
    KEY_READ: {"read"},
    KEY_SUBMIT: {"submit"},
    KEY_OPERATE: {"operate"},
    KEY_TENANT: {"submit", "read"},
    KEY_OPERATOR: {"submit", "read", "operate"},
}
# An endpoint is changed through the API by its owner only, operators included
# (they change any from the dashboard): another owner's answers 404.
OWNER_ONLY = {
    ("DELETE", "/webhooks/{uuidstr:endpoint_id}"),
    ("POST", "/webhooks/{uuidstr:endpoint_id}/rotate"),
    ("POST", "/webhooks/{uuidstr:endpoint_id}/disable"),
    ("POST", "/webhooks/{uuidstr:endpoint_id}/enable"),
}
PATCH_BODY = {
    ("PATCH", "/batches/{batch_id}"): {"token_budget": 1000},
    ("PATCH", "/schedules/{name}"): {"enabled": False},
}
# Bulk actions touch only a key's own jobs, `operate` or not (a dashboard session acts on all).
KEY_OWN_ONLY = {("POST", "/batches/{batch_id}/cancel")}
# Queues are named, not owned: the second-tenant test leaves them to the matrix.
NOT_OWNED = {("POST", "/queues/{queue}/pause"), ("POST", "/queues/{queue}/resume"), ("PATCH", "/queues/{queue}")}


def _second_tenants_objects() -> dict[str, dict[str, str]]:
    """Everything an id in a path can name, all of another key's (`submit,
    read`): a dead job and a batch whose job died, each with a delivery to
    the tenant's endpoint, and a generated page. Per path prefix, since a
    delivery is named under its job or its batch."""
    from jobs.models import Page, WebhookDelivery
    from jobs.services import create_endpoint, create_schedule, submit_batch, submit_job

    tenant_key = create_api_key("tenant-b", scopes=["submit", "read"]).api_key
    owner = tenant_key.owner
    endpoint = create_endpoint(owner=owner, url=HOOK_URL, event_types=["job.dead", "batch.completed"]).endpoint
    job = submit_job("demo.noop", {}, owner=owner).job
    make_dead(job.id)
    batch = submit_batch("theirs", [{"kind": "demo.noop", "payload": {}}], owner=owner).batch
    make_dead(batch.jobs.get().id)
    Page.objects.create(batch=batch, slug="intro", title="Intro", body_markdown="theirs")
    schedule = create_schedule(owner=owner, name=f"theirs-{owner}", kind="demo.noop", cron="@daily")
    common = {
        "job_id": str(job.id),
        "batch_id": str(batch.id),
        "endpoint_id": str(endpoint.id),
        "slug": "intro",
        "key_id": tenant_key.pk,
        "name": schedule.name,
    }
    return {
        "/jobs": {**common, "delivery_id": str(WebhookDelivery.objects.get(job=job, endpoint=endpoint).id)},
        "/batches": {**common, "delivery_id": str(WebhookDelivery.objects.get(batch=batch, endpoint=endpoint).id)},
        "/webhooks": common,
        "/schedules": common,
    }


def _id_routes() -> list[tuple[str, str]]:
    return [
        (method, path)
        for method, path in API
        if "{" in path and path != "/problems/{code}" and (method, path) not in NOT_OWNED
    ]


def _second_tenant_expected(role: str, method: str, path: str) -> str:
    scope = API[(method, path)]
    if role in SECOND_TENANT_KEYS:
        scopes = SECOND_TENANT_KEYS[role]
        if scope not in scopes:
            return "forbidden"
        sees_all = "operate" in scopes and (method, path) not in KEY_OWN_ONLY
    else:
        if role not in SESSION_SCOPE[scope]:
            return "forbidden"
        sees_all = True  # dashboard users read everything
    if not sees_all or (method, path) in OWNER_ONLY:
        return "not-found"
    if path.startswith("/schedules/") and role in SECOND_TENANT_KEYS:
        return "not-found"  # a key sees only its own schedules, operators' keys included
    return "allowed"


@pytest.mark.django_db
@pytest.mark.parametrize("role", [*SECOND_TENANT_KEYS, READER, OPERATOR])
def test_a_second_tenants_objects_answer_each_caller_as_the_model_says(role):
    """Every API route with an id, called with another tenant's real objects: a
    key without `operate` gets 404 (exactly as for what does not exist) or 403
    for a scope it lacks; a key with `operate` and a session see them."""
    import json

    callers = Callers()
    if role in SECOND_TENANT_KEYS and role not in callers.keys:
        callers.keys[role] = create_api_key(role, scopes=sorted(SECOND_TENANT_KEYS[role])).key
    routes = _id_routes()
    assert len(routes) >= 15
    failures = []
    for method, path in routes:
        objects = _second_tenants_objects()["/" + path.split("/")[1]]
        client, headers = callers.client(role)
        body = PATCH_BODY.get((method, path))
        kwargs = {"data": json.dumps(body), "content_type": "application/json"} if body is not None else {}
        response = client.generic(method, "/api/v1" + _fill(path, objects), headers=headers, **kwargs)
        expected = _second_tenant_expected(role, method, path)
        status = response.status_code
        ok = {
            "forbidden": status == 403,
            "not-found": status == 404,
            # Past the checks: a state conflict (cancelling a dead job) is fine.
            "allowed": status < 500 and status not in (401, 403, 404),
        }[expected]
        if status >= 400:
            ok = ok and response["Content-Type"] == "application/problem+json"
        if not ok:
            failures.append((method, path, expected, status))
    assert not failures, failures


def _dashboard_id_routes() -> list[str]:
    """The dashboard routes whose URL names an object (read from the resolver)."""
    resolver = get_resolver()
    (dashboard,) = [p for p in resolver.url_patterns if isinstance(p, URLResolver) and p.namespace == "dashboard"]
    return [p.name for p in dashboard.url_patterns if isinstance(p, URLPattern) and "<" in str(p.pattern)]


@pytest.mark.django_db
@pytest.mark.parametrize("role", [READER, OPERATOR])
def test_dashboard_routes_with_ids_answer_for_a_second_tenants_objects_as_the_model_says(role):
    """The dashboard is one tenant's view of everything: a signed-in user reads
    every owner's jobs, batches, pages and endpoints (README, "Who sees
    what"), and only an operator acts on them."""
    callers = Callers()
    client, headers = callers.client(role)
    names = _dashboard_id_routes()
    assert {"job", "batch", "batch-page", "batch-export", "webhook", "webhook-delivery"} <= set(names)
    failures = []
    for name in names:
        for method, needs in DASHBOARD[name].items():
            tenant = _second_tenants_objects()
            objects = tenant["/batches" if name.startswith("batch") else "/jobs"]
            # Real ids and slugs, where the matrix above makes some up.
            url = _dashboard_url(name, objects)
            data = {"job": objects["job_id"]} if method == "POST" and name != "batch-retry" else {}
            response = client.generic(method, url, _encode(data), content_type=_FORM, headers=headers)
            expected = _dashboard_expected(role, needs)
            ok = {
                "forbidden": response.status_code == 403,
                "allowed": response.status_code in {200, 302} | ({422} if method == "POST" else set()),
            }[expected]
            if not ok:
                failures.append((method, url, expected, response.status_code))
    assert not failures, failures


@pytest.mark.django_db
@pytest.mark.parametrize("role", [READER, OPERATOR])
def test_the_workers_page_shows_another_tenants_running_job_to_staff_only(role, heartbeat):
    """The workers page names the job each worker runs, whoever owns it: staff
    see it (and its kind), a signed-in non-staff user gets 403 on the page and
    on its polled partial, and the charts (counts per kind, no job id) are open
    to both."""
    import socket

    from jobs.engine.states import transition
    from jobs.services import submit_job

    callers = Callers()
    owner = create_api_key("tenant-b", scopes=["submit", "read"]).api_key.owner
    job = submit_job("demo.sleep", {"seconds": 1}, owner=owner).job
    heartbeat("default", workers=1)  # worker pid 1000 on this host
    transition(job.id, target=State.RUNNING, lease_owner=f"{socket.gethostname()}:1000")
    client, headers = callers.client(role)
    for extra in ({}, {"HX-Request": "true"}):
        response = client.get("/workers/", headers={**headers, **extra})
        if role == OPERATOR:
            assert response.status_code == 200
            assert str(job.id) in response.content.decode()
            assert b"demo.sleep" in response.content
        else:
            assert response.status_code == 403
            assert str(job.id).encode() not in response.content
            assert str(job.id)[:8].encode() not in response.content
    charts = client.get("/charts/?range=24h", headers=headers)
    assert charts.status_code == 200
    assert str(job.id)[:8].encode() not in charts.content
