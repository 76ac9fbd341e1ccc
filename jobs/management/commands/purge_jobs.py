from __future__ import annotations

from django.core.management.base import BaseCommand

from jobs import services


class Command(BaseCommand):
    help = "Delete finished jobs and their events older than the retention period."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than-days", type=int, help="default: CONVEYOR_RETENTION_DAYS (14)")

    def handle(self, *args, older_than_days=None, **options) -> None:
        if older_than_days is not None and older_than_days < 0:
            self.stderr.write("--older-than-days must be 0 or more")
            raise SystemExit(2)
        deleted = services.purge_finished(older_than_days=older_than_days)
        self.stdout.write(f"deleted {deleted['jobs']} finished jobs and {deleted['events']} old events")
