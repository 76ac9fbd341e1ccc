"""Production security settings, login rate limiting, and how API keys are
kept: hashed, compared in constant time, never in logs or the admin."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.utils import timezone

from jobs.engine import apikeys
from jobs.models import ApiKey
from tests.conftest import ROOT

# Nothing connects to it: `check` without --database does not touch the database.
UNUSED_DATABASE = "postgres://conveyor@127.0.0.1:9/conveyor"
PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "conveyor.example.com",
    "DATABASE_URL": UNUSED_DATABASE,
}


def _env(**variables: str) -> dict[str, str]:
    """The test process's environment without anything that would change the
    security settings, plus `variables`."""
    ours = ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_", "CONVEYOR_BEHIND_PROXY", "CSRF_", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return {**env, **variables}


def _manage(*args: str, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=_env(**variables),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _settings_of(**variables: str) -> dict:
    """Some security settings as a fresh process computes them from `variables`."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "print(json.dumps({n: getattr(s, n, None) for n in ("
        "'DEBUG', 'SECURE_SSL_REDIRECT', 'SECURE_HSTS_SECONDS', 'SESSION_COOKIE_SECURE', "
        "'CSRF_COOKIE_SECURE', 'SECURE_PROXY_SSL_HEADER', 'SECURE_REDIRECT_EXEMPT')}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(DJANGO_SETTINGS_MODULE="config.settings", **variables),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- check --deploy and the secure defaults -----------------------------------


def test_it_passes_the_deploy_check_with_only_debug_off_a_secret_key_and_allowed_hosts():
    done = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    assert "WARNING" not in done.stdout + done.stderr
    assert "security." not in done.stdout + done.stderr


def test_it_fails_the_deploy_check_when_debug_is_left_on():
    # The same command notices what it should: the check above is not vacuous.
    done = _manage("check", "--deploy", "--fail-level", "WARNING", **{**PRODUCTION, "DEBUG": "1"})
    assert done.returncode != 0
    assert "security.W018" in done.stdout + done.stderr


def test_it_turns_on_https_hsts_and_secure_cookies_when_debug_is_off():
    production = _settings_of(**PRODUCTION)
    assert production["SECURE_SSL_REDIRECT"] is True
    assert production["SECURE_HSTS_SECONDS"] >= 31536000
    assert production["SESSION_COOKIE_SECURE"] is True
    assert production["CSRF_COOKIE_SECURE"] is True
    # X-Forwarded-Proto is trusted only when a proxy is declared.
    assert production["SECURE_PROXY_SSL_HEADER"] is None


def test_it_keeps_plain_http_in_development():
    development = _settings_of(DATABASE_URL=UNUSED_DATABASE)
    assert development["DEBUG"] is True
    assert development["SECURE_SSL_REDIRECT"] is False
    assert development["SESSION_COOKIE_SECURE"] is False


def test_it_trusts_x_forwarded_proto_only_behind_a_declared_proxy():
    assert _settings_of(**PRODUCTION, CONVEYOR_BEHIND_PROXY="1")["SECURE_PROXY_SSL_HEADER"] == [
        "HTTP_X_FORWARDED_PROTO",
        "https",
    ]
    custom = _settings_of(**PRODUCTION, SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_SCHEME,https")
    assert custom["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_SCHEME", "https"]


@pytest.mark.django_db
@override_settings(SECURE_SSL_REDIRECT=True, SECURE_HSTS_SECONDS=31536000)
def test_it_redirects_plain_http_to_https_except_for_the_probes():
    client = Client()
    page = client.get("/jobs/")
    assert page.status_code == 301
    assert page["Location"] == "https://testserver/jobs/"
    for probe in ("/healthz", "/metrics"):
        assert client.get(probe).status_code == 200, probe
    assert client.get("/readyz").status_code in (200, 503)  # answered, not redirected
    assert client.get("/jobs/", secure=True)["Strict-Transport-Security"].startswith("max-age=31536000")


@pytest.mark.django_db
@override_settings(SECURE_SSL_REDIRECT=True, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_it_serves_https_requests_a_tls_proxy_forwards():
    response = Client().get("/accounts/login/", headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 200


# --- login rate limiting --------------------------------------------------------


@pytest.fixture
def ada(db):
    return User.objects.create_user("ada", password="correct horse battery")


def _login(client: Client, password: str, *, address: str = "10.0.0.1", username: str = "ada"):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address, follow=False
    )


def test_it_locks_a_username_out_from_an_address_after_five_failures(ada, settings):
    from axes.models import AccessAttempt

    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        response = _login(client, "wrong")
        assert response.status_code == 200
        assert b"Please enter a correct username and password" in response.content
    locked = _login(client, "wrong")
    assert locked.status_code == 429
    # Locked out: even the right password is refused, with a message saying why.
    refused = _login(client, "correct horse battery")
    assert refused.status_code == 429
    text = refused.content.decode()
    assert 'id="locked-out"' in text
    assert "Too many failed sign-ins" in text
    assert "15 minutes" in text
    assert "_auth_user_id" not in client.session
    # Counted in the database, which every Daphne process shares.
    attempt = AccessAttempt.objects.get(username="ada", ip_address="10.0.0.1")
    assert attempt.failures_since_start >= settings.AXES_FAILURE_LIMIT


def test_it_locks_out_only_that_username_from_that_address(ada, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login(client, "wrong")
    assert _login(Client(), "correct horse battery", address="10.0.0.2").status_code == 302
    User.objects.create_user("bob", password="another good one")
    assert _login(Client(), "another good one", username="bob").status_code == 302


def test_it_lets_the_user_in_again_after_the_cool_off(ada, settings):
    from axes.models import AccessAttempt

    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login(client, "wrong")
    assert _login(client, "correct horse battery").status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))
    assert _login(client, "correct horse battery").status_code == 302


def test_it_forgets_failures_after_a_successful_sign_in(ada, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, "correct horse battery").status_code == 302
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(Client(), "wrong").status_code == 200


# --- API keys: hashed, constant time, never shown -------------------------------


@pytest.mark.django_db
def test_it_stores_only_the_sha256_of_an_api_key():
    created = apikeys.create_api_key("ci-bot")
    row = ApiKey.objects.filter(pk=created.api_key.pk).values().get()
    assert row["hashed_key"] == hashlib.sha256(created.key.encode()).hexdigest()
    secret_part = created.key[len("cvk_") + 8 :]
    for column, value in row.items():
        assert secret_part not in str(value), column


@pytest.mark.django_db
def test_it_compares_api_keys_in_constant_time(monkeypatch):
    created = apikeys.create_api_key("ci-bot")
    compared = []
    real = apikeys.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", spy)
    assert apikeys.verify_api_key(created.key) is not None
    wrong = created.key[:-1] + ("A" if created.key[-1] != "A" else "B")
    assert apikeys.verify_api_key(wrong) is None
    # Both the right and the wrong key went through hmac.compare_digest
    # against the stored digest, not through ==.
    assert [a for a, _ in compared] == [created.api_key.hashed_key] * 2
    assert compared[1][1] == hashlib.sha256(wrong.encode()).hexdigest()


@pytest.mark.django_db
def test_it_never_logs_an_api_key(caplog):
    good = apikeys.create_api_key("ci-bot").key
    revoked = apikeys.create_api_key("old").key
    apikeys.revoke_api_key(revoked)
    made_up = "cvk_" + "x" * 40
    caplog.set_level(logging.DEBUG)
    client = Client()
    for key in (good, revoked, made_up):
        headers = {"Authorization": f"Bearer {key}"}
        client.get("/api/v1/jobs", headers=headers)
        client.post("/api/v1/jobs", "{not json", content_type="application/json", headers=headers)
        client.get("/api/v1/jobs/not-a-uuid", headers=headers)
    assert caplog.records, "the requests above log something (401s, 4xx)"
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for key in (good, revoked, made_up):
        assert key not in logged
        assert key[len("cvk_") + 8 :] not in logged


@pytest.mark.django_db
def test_it_never_shows_an_api_key_or_its_digest_in_the_admin(client):
    created = apikeys.create_api_key("ci-bot")
    client.force_login(User.objects.create_superuser("root", password="pw"))
    pages = [
        client.get("/admin/jobs/apikey/"),
        client.get(f"/admin/jobs/apikey/{created.api_key.pk}/change/"),
        client.get("/admin/jobs/apikey/", {"q": created.api_key.prefix}),
    ]
    for page in pages:
        assert page.status_code == 200
        text = page.content.decode()
        assert f"cvk_{created.api_key.prefix}" in text  # the prefix names it
        assert created.key not in text
        assert created.api_key.hashed_key not in text
