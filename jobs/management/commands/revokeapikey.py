"""`manage.py revokeapikey PREFIX`: revoke an API key."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from jobs.engine.apikeys import display_prefix


class Command(BaseCommand):
    help = "Revoke an API key, named by its prefix (cvk_ and the next 8 characters) or by the whole key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="the key's prefix, e.g. cvk_AbCd1234, or the whole key")

    def handle(self, *args, key: str, **options) -> None:
        try:
            api_key = services.revoke_api_key(key)
        except services.ApiKeyNotFound as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(
            f"revoked {api_key.name!r} ({display_prefix(api_key)}) at {api_key.revoked_at:%Y-%m-%d %H:%M:%S}Z"
        )
