from __future__ import annotations

from django.core.management.base import BaseCommand

from jobs import services


class Command(BaseCommand):
    help = (
        "Delete finished jobs and their events older than the retention period (dead jobs: their own, longer one;"
        " jobs with a webhook message still to deliver are kept)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than-days", type=int, help="default: CONVEYOR_RETENTION_DAYS (14)")
        parser.add_argument(
            "--dead-older-than-days", type=int, help="dead jobs; default: CONVEYOR_DEAD_RETENTION_DAYS (90)"
        )

    def handle(self, *args, older_than_days=None, dead_older_than_days=None, **options) -> None:
        for flag, value in (("--older-than-days", older_than_days), ("--dead-older-than-days", dead_older_than_days)):
            if value is not None and value < 0:
                self.stderr.write(f"{flag} must be 0 or more")
                raise SystemExit(2)
        deleted = services.purge_finished(older_than_days=older_than_days, dead_older_than_days=dead_older_than_days)
        states = ", ".join(f"{state} {count}" for state, count in deleted["by_state"].items())
        self.stdout.write(
            f"deleted {deleted['jobs']} finished jobs{f' ({states})' if states else ''}"
            f" and {deleted['events']} old events"
        )
