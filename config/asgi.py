"""ASGI entry point served by Daphne: Django for HTTP, Channels consumers for SSE."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# No cyclic collection while the app loads: nothing it allocates is garbage,
# and the collector's passes over it were a fifth of the start (manage.py
# does the same). On again at the end, after gc.freeze().
gc.disable()

import django  # noqa: E402

django.setup(set_prefix=False)

from config.middleware import DjangoProtections, ProxyHeaders  # noqa: E402
from config.server import form_parsing, handler, tcp_writes  # noqa: E402

# Daphne's connections send at once instead of on the reactor's next turn
# (the SSE streams' many small writes; see config/server/tcp_writes.py).
tcp_writes.install()
# Twisted does not parse the forms Daphne never reads (config/server/form_parsing.py).
form_parsing.install()

django_asgi_app = handler.application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import re_path  # noqa: E402

from config.simulator import simulated  # noqa: E402
from dashboard.routing import http_urlpatterns as event_streams  # noqa: E402
from jobs.api.intake import Intake  # noqa: E402

django_http = ASGIStaticFilesHandler(django_asgi_app)
intake = Intake(django_http)

# Static files (CSS, htmx) are served by the app itself so that `make run`
# needs nothing else; a proxy in front may serve STATIC_ROOT instead.
application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                # Server-sent events (/events/…, /api/v1/events), with the
                # dashboard's session and user.
                # Host check, HTTPS redirect and security headers as Django's
                # middleware would (config/middleware.py).
                re_path(
                    r"^(?=events/|api/v1/events$)",
                    DjangoProtections(AuthMiddlewareStack(URLRouter(event_streams)), django_http),
                ),
                # The simulated LLM provider, ahead of Django's middleware: its
                # hundreds of concurrent calls would otherwise cost a dozen
                # thread hops each (the Django views serve the same endpoint).
                re_path(r"^(?=simulated/v1/)", DjangoProtections(simulated.asgi_app, django_http)),
                # Job submissions with an API key, ahead of Django's request
                # cycle; what it does not answer itself goes to Django.
                *([re_path(r"^api/v1/jobs$", intake)] if settings.CONVEYOR["INTAKE"] else []),
                re_path(r"", django_http),
            ]
        )
    }
)

# Behind a proxy, the client's address is the one the proxy forwards; never
# otherwise (Daphne runs without --proxy-headers, which trusted anyone).
if settings.CONVEYOR_BEHIND_PROXY:
    application = ProxyHeaders(application)

# Everything loaded so far lives as long as the process: keep it out of the
# cyclic garbage collector's full passes, which otherwise walk all of Django
# and stalled requests (it showed in the API's tail latency).
gc.freeze()
gc.enable()
