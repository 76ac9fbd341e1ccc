"""ASGI entry point served by Daphne: Django for HTTP, Channels consumers for SSE."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

# Static files (CSS, htmx) are served by the app itself so that `make run`
# needs nothing else; a proxy in front may serve STATIC_ROOT instead.
application = ProtocolTypeRouter({"http": ASGIStaticFilesHandler(django_asgi_app)})
