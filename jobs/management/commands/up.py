"""`manage.py up`: the whole system in the foreground (what `make run` calls).

1. The embedded Postgres is started by settings when DATABASE_URL is unset.
2. Migrations are applied.
3. Daphne serves config.asgi on 127.0.0.1:$PORT, and one Django-Q2 cluster
   runs per queue in CONVEYOR_QUEUES (default: "default,llm,webhooks").
4. Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace
   period) and then the embedded Postgres if this command started it. If a
   child dies on its own, everything is stopped and the command fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from config import embedded_db

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
        if not 1 <= port <= 65535:
            raise CommandError(f"--port {port} is not a TCP port")
        queue_names = [q.strip() for q in queues.split(",") if q.strip()]
        if not queue_names:
            raise CommandError("--queues names no queue")

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
        children: dict[str, subprocess.Popen] = {}
        # Own sessions: Ctrl-C reaches only this process, which stops the
        # children in order instead of all at once.
        # A listen backlog well above Twisted's 50, for bursts of clients.
        endpoint = f"tcp:port={port}:interface={host}:backlog=1024"
        children["daphne"] = subprocess.Popen(
            [python, "-m", "daphne", "-e", endpoint, "config.asgi:application"],
            env={**os.environ, "CONVEYOR_DB_POOL": os.environ.get("CONVEYOR_DB_POOL", "1")},
            start_new_session=True,
        )
        for queue in queue_names:
            env = {**os.environ, "Q_CLUSTER_NAME": queue}
            children[f"qcluster[{queue}]"] = subprocess.Popen(
                [python, manage, "qcluster"], env=env, start_new_session=True
            )
        self.stdout.write(f"Conveyor is up: http://{host}:{port}/  (queues: {', '.join(queue_names)}; Ctrl-C stops)")

        failed = None
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    failed = f"{name} exited with status {child.returncode}"
                    stopping = True
                    break
            time.sleep(0.2)

        self.stdout.write("stopping…")
        self._stop_children(children)
        if settings.EMBEDDED_POSTGRES and embedded_db.started_here:
            embedded_db.stop(settings.DATA_DIR / "pg")
            self.stdout.write("embedded Postgres stopped")
        if failed:
            raise CommandError(failed)
        self.stdout.write("stopped")

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
