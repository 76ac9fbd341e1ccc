"""`manage.py createapikey NAME [--scopes submit,read,operate]`: print a new API key."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from jobs.engine.apikeys import SCOPES, display_prefix


class Command(BaseCommand):
    help = "Create an API key and print it, alone, on the last line (it is not stored and cannot be shown again)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument(
            "--scopes",
            default=",".join(SCOPES),
            help=f"comma-separated, any of {', '.join(SCOPES)} (default: all)",
        )

    def handle(self, *args, name: str, scopes: str, **options) -> None:
        try:
            created = services.create_api_key(name, scopes=[s.strip() for s in scopes.split(",") if s.strip()])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        api_key = created.api_key
        self.stderr.write(
            f"API key {api_key.name!r} ({display_prefix(api_key)}…, scopes: {', '.join(api_key.scopes)}). "
            "Store it now: it is shown only once."
        )
        self.stdout.write(created.key)
