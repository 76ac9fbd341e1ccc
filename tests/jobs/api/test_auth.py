"""API keys and sessions: 401 without a valid credential, 403 without the scope."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client

from jobs.engine.apikeys import verify_api_key
from jobs.models import ApiKey, Job
from tests.jobs.api.conftest import ApiClient, assert_problem

NOOP = {"kind": "demo.noop", "payload": {}}


def test_no_credentials_is_a_401_with_a_bearer_challenge():
    response = ApiClient().get("/jobs")

    assert_problem(response, 401, "not-authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_an_unknown_key_is_a_401(db):
    assert_problem(ApiClient("cvk_" + "x" * 40).get("/jobs"), 401, "not-authenticated")
    assert_problem(ApiClient("not-even-a-key").get("/jobs"), 401, "not-authenticated")


def test_a_key_with_a_wrong_secret_is_a_401(make_key):
    key = make_key()
    forged = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")

    assert_problem(ApiClient(forged).get("/jobs"), 401)


def test_a_revoked_key_is_a_401(make_key):
    key = make_key()
    call_command("revokeapikey", key[:12], stdout=StringIO())

    assert_problem(ApiClient(key).get("/jobs"), 401, "not-authenticated")


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body"),
    [
        (("submit", "operate"), "get", "/jobs", None),
        (("read", "operate"), "post", "/jobs", NOOP),
        (("read", "operate"), "post", "/batches", {"name": "b", "jobs": [NOOP]}),
        (("read", "submit"), "post", "/dlq/retry", {"filter": {}}),
        (("read", "submit"), "post", "/dlq/discard", {"ids": []}),
    ],
)
def test_a_key_without_the_scope_is_a_403(make_key, scopes, method, path, body):
    client = ApiClient(make_key(scopes))

    response = client.get(path) if method == "get" else client.post(path, body)

    assert_problem(response, 403, "forbidden")


def test_a_key_with_the_scope_gets_in(make_key):
    assert ApiClient(make_key(("read",))).get("/jobs").status_code == 200
    assert ApiClient(make_key(("submit",))).post("/jobs", NOOP).status_code == 202


def test_only_a_digest_of_the_key_is_stored(make_key):
    key = make_key()

    stored = ApiKey.objects.get()
    assert key not in {stored.prefix, stored.hashed_key, str(stored.scopes)}
    assert stored.hashed_key == hashlib.sha256(key.encode()).hexdigest()
    assert verify_api_key(key) == stored
    assert stored.last_used_at is None
    verify_api_key(key)
    stored.refresh_from_db()
    assert stored.last_used_at is not None


def test_createapikey_prints_the_key_alone_on_the_last_line(db):
    out, err = StringIO(), StringIO()

    call_command("createapikey", "ci", stdout=out, stderr=err)

    key = out.getvalue().strip().splitlines()[-1]
    assert key.startswith("cvk_") and " " not in key
    api_key = verify_api_key(key)
    assert api_key.name == "ci"
    assert api_key.scopes == ["operate", "read", "submit"]
    assert key not in err.getvalue()


def test_createapikey_takes_scopes(db):
    out = StringIO()

    call_command("createapikey", "reader", "--scopes", "read", stdout=out, stderr=StringIO())

    assert verify_api_key(out.getvalue().strip()).scopes == ["read"]
    with pytest.raises(CommandError, match="scopes"):
        call_command("createapikey", "bad", "--scopes", "read,write", stdout=StringIO(), stderr=StringIO())


def test_revokeapikey_refuses_an_unknown_prefix(db):
    with pytest.raises(CommandError, match="no API key"):
        call_command("revokeapikey", "cvk_AAAAAAAA", stdout=StringIO())


# --- session users --------------------------------------------------------


@pytest.fixture
def user(db):
    return User.objects.create(username="ada")  # force_login needs no password


def _session(user, *, enforce_csrf: bool = True) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf)
    client.force_login(user)
    return client


def test_a_logged_in_user_may_read(user):
    assert ApiClient(client=_session(user)).get("/jobs").status_code == 200


def test_a_session_post_without_the_csrf_token_is_a_403(user):
    user.user_permissions.add(Permission.objects.get(codename="add_job"))

    assert_problem(ApiClient(client=_session(user)).post("/jobs", NOOP), 403, "csrf-failed")
    assert Job.objects.count() == 0


def test_a_session_post_with_the_csrf_token_submits_as_the_user(user):
    user.user_permissions.add(Permission.objects.get(codename="add_job"))
    client = _session(user)
    token = "t" * 32  # what the dashboard's pages put in the csrftoken cookie
    client.cookies["csrftoken"] = token

    response = ApiClient(client=client).post("/jobs", NOOP, **{"X-CSRFToken": token})

    assert response.status_code == 202, response.content
    assert Job.objects.get().owner == f"user:{user.pk}"


def test_a_user_without_the_permission_is_a_403(user):
    client = _session(user, enforce_csrf=False)

    assert_problem(ApiClient(client=client).post("/jobs", NOOP), 403, "forbidden")
