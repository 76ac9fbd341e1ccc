"""X-Forwarded-For is the client's own say unless a proxy we were told about
sets it: the sign-in lockout must not count failures against an address the
client picked. Daphne runs exactly as the Procfile and the systemd unit start
it (on a loopback port)."""

from __future__ import annotations

import re
import shlex
import sys

import httpx
import pytest

from tests.conftest import ROOT, Processes, free_port

pytestmark = pytest.mark.processes

FORGED = "203.0.113.7"


def _procfile_web(port: int) -> tuple[list[str], dict[str, str]]:
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    words = shlex.split(line.removeprefix("web:").replace("${PORT:-8000}", str(port)))
    env = {}
    if words[0] == "env":
        words.pop(0)
        while "=" in words[0]:
            name, _, value = words.pop(0).partition("=")
            env[name] = value
    return words, env


def _systemd_web(port: int) -> tuple[list[str], dict[str, str]]:
    unit = (ROOT / "deploy" / "systemd" / "conveyor-web@.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", unit, re.MULTILINE))
    words = shlex.split(exec_start.replace("%i", str(port)))
    words[0] = words[0].rsplit("/", 1)[-1]
    return words, env


def _start_web(processes: Processes, command, **env: str) -> str:
    port = free_port()
    words, unit_env = command(port)
    assert words[0] == "daphne", words
    # Loopback only on this shared machine; everything else as written.
    args = [sys.executable, "-m", "daphne", *(w.replace("interface=0.0.0.0", "interface=127.0.0.1") for w in words[1:])]
    proc = processes.start("daphne", args, **{**unit_env, **env})
    url = f"http://127.0.0.1:{port}"
    processes.wait_healthy(proc, url)
    return url


def _fail_sign_in(url: str, username: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/accounts/login/",
            data={"username": username, "password": "wrong", "csrfmiddlewaretoken": token},
            headers={"X-Forwarded-For": FORGED},
        )
        assert response.status_code == 200, response.text[:500]


def _addresses(username: str) -> set[str]:
    from axes.models import AccessAttempt

    return set(AccessAttempt.objects.filter(username=username).values_list("ip_address", flat=True))


@pytest.mark.parametrize("command", [_procfile_web, _systemd_web], ids=["procfile", "systemd"])
def test_a_forged_x_forwarded_for_does_not_move_the_lockout_without_a_declared_proxy(processes, command):
    url = _start_web(processes, command, CONVEYOR_BEHIND_PROXY="0", DEBUG="1")
    _fail_sign_in(url, "mallory")
    assert _addresses("mallory") == {"127.0.0.1"}


def test_behind_a_declared_proxy_the_lockout_sees_the_address_the_proxy_set(processes):
    url = _start_web(processes, _procfile_web, CONVEYOR_BEHIND_PROXY="1", DEBUG="1")
    _fail_sign_in(url, "trudy")
    assert _addresses("trudy") == {FORGED}


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ([b"198.51.100.1"], "198.51.100.1"),
        # An appending proxy: the last entry is the one it wrote.
        ([b"203.0.113.7, 198.51.100.1"], "198.51.100.1"),
        ([b"203.0.113.7", b"2001:db8::1"], "2001:db8::1"),
        # Not an address: the connection's peer stays.
        ([b"localhost"], "192.0.2.9"),
        ([b""], "192.0.2.9"),
        ([], "192.0.2.9"),
    ],
)
def test_behind_a_proxy_the_client_is_the_last_forwarded_address(forwarded, client):
    import asyncio

    from config.middleware import ProxyHeaders

    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"][0]

    scope = {
        "type": "http",
        "headers": [(b"x-forwarded-for", value) for value in forwarded],
        "client": ("192.0.2.9", 5),
    }
    asyncio.run(ProxyHeaders(app)(scope, None, None))
    assert seen["client"] == client
