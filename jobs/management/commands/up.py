"""`manage.py up`: the whole system in the foreground (what `make run` calls).

1. The embedded Postgres is started by settings when DATABASE_URL is unset.
2. Migrations are applied.
3. Daphne serves config.asgi on 127.0.0.1:$PORT, and one Django-Q2 cluster
   runs per queue in CONVEYOR_QUEUES (default: "default,llm,webhooks").
4. Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace
   period) and then the embedded Postgres, unless another live process has it
   open (config.embedded_db.stop_unless_used). If a child dies on its own,
   everything is stopped and the command fails.

Killed itself (SIGKILL), `up` leaves the stopping to its lifeline watcher
(config/supervisor.py). A second `up` on the same data directory, or on a port
in use, refuses in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from config import embedded_db, supervisor

GRACE_SECONDS = 20


class Command(BaseCommand):
    help = "Migrate, then run Daphne and the Django-Q2 cluster(s) until Ctrl-C or SIGTERM."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--queues",
            default=",".join(settings.CONVEYOR_QUEUES),
            help="comma-separated queues; one cluster is started for each",
        )

    def handle(self, *args, host: str, port: int, queues: str, **options) -> None:
        pgdata = settings.DATA_DIR / "pg"
        if not 1 <= port <= 65535:
            self._refuse(f"--port {port} is not a TCP port", pgdata)
        queue_names = [q.strip() for q in queues.split(",") if q.strip()]
        if not queue_names:
            self._refuse("--queues names no queue", pgdata)

        try:
            lock_fd = supervisor.lock_instance(settings.DATA_DIR)
        except supervisor.AlreadyRunning as exc:
            self._refuse(str(exc), pgdata)
        if supervisor.port_in_use(host, port):
            os.close(lock_fd)
            self._refuse(f"port {port} on {host} is already in use (another Conveyor or another server)", pgdata)

        lifeline = supervisor.Lifeline(lock_fd)
        if settings.EMBEDDED_POSTGRES:
            lifeline.watch_postgres(pgdata)
        children: dict[str, subprocess.Popen] = {}
        failed = None
        try:
            failed = self._run(host, port, queue_names, children, lifeline)
        finally:
            self.stdout.write("stopping…")
            self._stop_children(children)
            if settings.EMBEDDED_POSTGRES:
                self._settle_postgres(pgdata)
            lifeline.release()
            os.close(lock_fd)
        if failed:
            raise CommandError(failed)
        self.stdout.write("stopped")

    def _run(
        self,
        host: str,
        port: int,
        queue_names: list[str],
        children: dict[str, subprocess.Popen],
        lifeline: supervisor.Lifeline,
    ) -> str | None:
        """Run until a stop signal (None) or a child's death (what happened)."""
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("database migrated")

        stopping = False

        def request_stop(signum, _frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        python = sys.executable
        manage = str(settings.BASE_DIR / "manage.py")

        def start(name: str, args: list[str], env: dict[str, str]) -> None:
            # Own sessions: Ctrl-C reaches only this process, which stops the
            # children in order instead of all at once. Each session is a
            # process group the lifeline can stop should this process be killed.
            children[name] = subprocess.Popen(
                args, env=env, start_new_session=True, preexec_fn=supervisor.die_with_parent()
            )
            lifeline.watch_group(children[name].pid)

        # A listen backlog well above Twisted's 50, for bursts of clients.
        endpoint = f"tcp:port={port}:interface={host}:backlog=1024"
        start(
            "daphne",
            [python, "-m", "daphne", "-e", endpoint, "config.asgi:application"],
            {**os.environ, "CONVEYOR_DB_POOL": os.environ.get("CONVEYOR_DB_POOL", "1")},
        )
        for queue in queue_names:
            start(f"qcluster[{queue}]", [python, manage, "qcluster"], {**os.environ, "Q_CLUSTER_NAME": queue})
        self.stdout.write(f"Conveyor is up: http://{host}:{port}/  (queues: {', '.join(queue_names)}; Ctrl-C stops)")

        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    return f"{name} exited with status {child.returncode}"
            time.sleep(0.2)
        return None

    def _refuse(self, message: str, pgdata: Path) -> NoReturn:
        # Before anything ran: stop only a server this command started for nothing.
        if settings.EMBEDDED_POSTGRES and embedded_db.started_here(pgdata):
            embedded_db.stop_unless_used(pgdata)
        raise CommandError(message)

    def _settle_postgres(self, pgdata: Path) -> None:
        """Stop the embedded server, whoever started it, unless another live
        process has it open (a shell, a test run, a one-off command)."""
        users = embedded_db.stop_unless_used(pgdata)
        if users:
            self.stdout.write(f"embedded Postgres left running: in use by pid {', '.join(map(str, users))}")
        else:
            self.stdout.write("embedded Postgres stopped")

    def _stop_children(self, children: dict[str, subprocess.Popen]) -> None:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for name, child in children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in {GRACE_SECONDS} s; killing it")
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
