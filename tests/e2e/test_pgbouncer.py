"""Conveyor behind Debian's PgBouncer in transaction pooling mode.

PgBouncer (a subprocess, its ini generated here) listens on loopback and
authenticates its clients with SCRAM; its server connections log in to the
test database over the embedded Postgres' Unix socket. Two qclusters and
Daphne get DATABASE_URL = PgBouncer and DATABASE_DIRECT_URL = Postgres itself
(config/settings.py, "Behind PgBouncer"). Through it: jobs succeed, a retry
happens, a permanent failure lands in the dead-letter queue and an API retry
runs it again, and an SSE client sees a job's events live. Afterwards no
session state is left on any of PgBouncer's server connections (prepared
statements, LISTEN, a session SET, advisory locks) and no process logged a
pooling error.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Processes, free_port, test_database_url, wait_until
from tests.e2e.test_sse_two_daphnes import StreamReader, session_cookie

pytestmark = pytest.mark.processes

PGBOUNCER = "/usr/sbin/pgbouncer"
POOL_SIZE = 4  # few server connections for many clients: each is shared
CLIENT = "conveyor"

# What a process' log must never show behind the pooler.
POOLING_ERRORS = (
    "prepared statement",  # e.g. 'prepared statement "_pg3_0" does not exist'
    "does not exist",
    "LISTEN connection lost",
    "event hub: connection lost",
    "unsupported startup parameter",
    "server closed the connection",
    "Traceback",
)


def _run_as(host: str) -> list[str]:
    """PgBouncer will not run as root: then it takes the identity of whoever
    owns the Postgres socket directory `host` (the embedded server's own
    user), who can reach the socket; `nobody` for a server on TCP. As any
    other user it runs as that user."""
    if os.geteuid() != 0:
        return []
    owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "root"
    return ["-u", owner if owner != "root" else "nobody"]


class PgBouncer:
    def __init__(self, processes: Processes, directory: Path) -> None:
        from django.db import connection

        settings = connection.settings_dict
        self.dbname = settings["NAME"]
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        # How PgBouncer's server connections log in: as the test database's own user.
        login = {"host": settings["HOST"], "port": settings["PORT"], "password": settings["PASSWORD"]}
        server = f"dbname={self.dbname} user={settings['USER']}"
        server += "".join(f" {name}={value}" for name, value in login.items() if value)
        (directory / "userlist.txt").write_text(f'"{CLIENT}" "{self.password}"\n')
        (directory / "pgbouncer.ini").write_text(
            f"""[databases]
{self.dbname} = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_db_connections = {POOL_SIZE}
max_client_conn = 500
query_wait_timeout = 60
"""
        )
        self.proc = processes.start(
            "pgbouncer", [PGBOUNCER, *_run_as(settings["HOST"] or "/"), str(directory / "pgbouncer.ini")]
        )
        self.processes = processes
        wait_until(self.answers, timeout=30, message="PgBouncer to accept a connection")

    @property
    def url(self) -> str:
        return f"postgres://{CLIENT}:{self.password}@127.0.0.1:{self.port}/{self.dbname}"

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, connect_timeout=10)

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"pgbouncer exited:\n{self.log()}")
        try:
            with self.connect() as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    def log(self) -> str:
        return self.processes.log_of(self.proc)


@pytest.fixture
def pgbouncer(processes, tmp_path) -> PgBouncer:
    assert shutil.which(PGBOUNCER), "install Debian's pgbouncer (.ci/run does)"
    directory = tmp_path / "pgbouncer"
    directory.mkdir()
    return PgBouncer(processes, directory)


def _api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _submit(api: httpx.Client, kind: str, payload: dict, **options) -> str:
    response = api.post("/jobs", json={"kind": kind, "payload": payload, **options})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _state(api: httpx.Client, job_id: str) -> dict:
    response = api.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _leftover_session_state(bouncer: PgBouncer) -> list[tuple]:
    """Every server connection of PgBouncer's pool at once (POOL_SIZE clients
    each inside a transaction, which pins one server connection each): its
    backend pid, prepared statements, LISTEN channels and synchronous_commit."""
    conns = [bouncer.connect() for _ in range(POOL_SIZE)]
    try:
        return [
            conn.execute(
                "SELECT pg_backend_pid(), (SELECT count(*) FROM pg_prepared_statements),"
                " (SELECT count(*) FROM pg_listening_channels()), current_setting('synchronous_commit')"
            ).fetchone()
            for conn in conns  # each stays in its transaction until closed
        ]
    finally:
        for conn in conns:
            conn.close()


def test_conveyor_runs_behind_pgbouncer_in_transaction_mode(processes, pgbouncer, django_user_model):
    from jobs.engine.apikeys import create_api_key
    from jobs.models import JobEvent

    key = create_api_key("pgbouncer", scopes=("submit", "read", "operate")).key
    cookie = session_cookie(django_user_model.objects.create_user("watcher", password="pw"))
    env = {"DATABASE_URL": pgbouncer.url, "DATABASE_DIRECT_URL": test_database_url()}
    clusters = [processes.qcluster(**env), processes.qcluster(**env)]
    daphne, url = processes.daphne(CONVEYOR_DB_POOL="1", **env)  # with its pool, as `manage.py up` runs it
    api = _api(url, key)

    # Live events: the stream opens once the hub LISTENs (on the direct URL).
    reader = StreamReader(f"{url}/api/v1/events?queue=default", cookie)
    reader.start()
    assert reader.opened.wait(30) and reader.error is None, reader.error
    try:
        sleeper = _submit(api, "demo.sleep", {"seconds": 0.6, "steps": 3})
        retried = _submit(api, "demo.fail", {"succeed_on_attempt": 2}, backoff_base=0.2, backoff_max=0.5)
        doomed = _submit(api, "demo.fail", {"mode": "permanent"})
        waiter = _submit(api, "demo.async_sleep", {"seconds": 0.2, "steps": 2})
        many = [_submit(api, "demo.noop", {}) for _ in range(40)]

        expected = ["job.created", "job.started", "job.progress", "job.progress", "job.progress", "job.succeeded"]
        wait_until(
            lambda: [name for _, name in reader.events_of(sleeper) if name != "job.log"] == expected,
            timeout=60,
            interval=0.2,
            message=lambda: f"the SSE client to see the job's events live; saw {reader.events_of(sleeper)}",
        )

        def finished(job_id: str, state: str) -> bool:
            return _state(api, job_id)["state"] == state

        for job_id in [*many, waiter]:
            wait_until(lambda j=job_id: finished(j, "succeeded"), timeout=60, interval=0.2, message=f"{job_id}")
        wait_until(lambda: finished(retried, "succeeded"), timeout=60, interval=0.2, message="the retried job")
        assert _state(api, retried)["attempts"] == 2
        assert JobEvent.objects.filter(job_id=retried, type="job.retrying").count() == 1

        # The dead-letter queue, and a retry from the API that runs it again.
        wait_until(lambda: finished(doomed, "dead"), timeout=60, interval=0.2, message="the permanent failure")
        dead = api.get("/dlq", params={"kind": "demo.fail"}).json()["items"]
        assert [job["id"] for job in dead] == [doomed]
        again = api.post(f"/jobs/{doomed}/retry")
        assert again.status_code == 202, again.text
        wait_until(
            lambda: JobEvent.objects.filter(job_id=doomed, type="job.started").count() == 2,
            timeout=60,
            interval=0.2,
            message="the retried dead job to run again",
        )
        wait_until(lambda: finished(doomed, "dead"), timeout=60, interval=0.2, message="the retry to end dead again")
        wait_until(
            lambda: [name for _, name in reader.events_of(doomed)].count("job.dead") == 2,
            timeout=30,
            interval=0.2,
            message="the SSE client to see both deaths",
        )
    finally:
        reader.stop.set()

    assert [proc.poll() for proc in [*clusters, daphne]] == [None, None, None]  # all still up
    # The LISTEN connections on Postgres itself: each cluster's broker and the hub.
    with psycopg.connect(test_database_url()) as direct:
        listening = direct.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name IN ('conveyor-broker-default', 'conveyor-event-hub') ORDER BY 1"
        ).fetchall()
    assert listening == [("conveyor-broker-default",)] * 2 + [("conveyor-event-hub",)]

    for proc in [*clusters, daphne]:
        proc.terminate()
    for proc in [*clusters, daphne]:
        proc.wait(timeout=30)
    bouncer_log = pgbouncer.log()
    logs = {f"qcluster {c.pid}": processes.log_of(c) for c in clusters} | {"daphne": processes.log_of(daphne)}

    for name, text in logs.items():
        found = [line for line in text.splitlines() if any(error in line for error in POOLING_ERRORS)]
        assert found == [], f"{name} logged pooling errors:\n" + "\n".join(found)
    assert " ERROR " not in bouncer_log, bouncer_log

    # Nothing session-scoped was left on the server connections clients share.
    state = _leftover_session_state(pgbouncer)
    assert len({pid for pid, *_ in state}) == POOL_SIZE, state
    assert [tuple(row[1:]) for row in state] == [(0, 0, "on")] * POOL_SIZE, state
    with psycopg.connect(test_database_url()) as direct:
        locks = direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
    assert locks == 0
