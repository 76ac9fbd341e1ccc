"""Django's HTTP side under Daphne, run the way a WSGI server runs it.

Django's stock ASGI handler adapts every synchronous middleware and view on
its own: about sixteen hops per request between the event loop and a thread
created for that request. Under load the hops queue behind one another on the
GIL and a short request waits far longer than it runs. Conveyor's views are all
synchronous, so this handler loads the middleware in synchronous mode and
runs a request's whole chain in ONE hop to a fixed pool of threads; each
thread keeps its database connection between requests (or borrows one from
the pool when CONVEYOR_DB_POOL is on). The event loop only reads the body and
writes the response, as for Channels' SSE consumers beside it.

It overrides internals of Django 5.2.19's `ASGIHandler` (`load_middleware`,
`__call__`, `get_response_async`, `handle`); `application()` builds it on that
version and Django's own `ASGIHandler` on any other (config/server/patching.py).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections, connections

from config.server.patching import guarded

NAME = "django-asgi-handler"
PACKAGE = "Django"
VERSIONS = ("5.2.19",)


def application() -> ASGIHandler:
    """Django's HTTP application: this handler on the Django it was written
    for, Django's own ASGIHandler on any other."""
    if guarded(NAME, package=PACKAGE, versions=VERSIONS, install=lambda: None):
        return ThreadPoolASGIHandler()
    return ASGIHandler()


class ThreadPoolASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._size = settings.CONVEYOR["HTTP_THREADS"]
        self._threads = ThreadPoolExecutor(max_workers=self._size, thread_name_prefix="django-http")

    def close(self) -> None:
        """Close the threads' database connections and end them; the next
        request starts new ones."""
        threads = self._threads
        self._threads = ThreadPoolExecutor(max_workers=self._size, thread_name_prefix="django-http")
        # Each task waits for the others, so every thread takes exactly one.
        every = threading.Barrier(self._size)
        for _ in range(self._size):
            threads.submit(_close_then_wait, every)
        threads.shutdown(wait=True)

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def __call__(self, scope, receive, send) -> None:
        # The stock handler opens a ThreadSensitiveContext here: a new thread
        # per request for its thread-sensitive hops. Only the request_started
        # and response.close() signals hop now, and they are short.
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def get_response_async(self, request):
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._respond, request)

    def _respond(self, request):
        # request_started/finished run close_old_connections on the event
        # loop's side; this thread's own connection needs the same care (a
        # connection broken by a Postgres restart is dropped, not reused).
        close_old_connections()
        try:
            return self.get_response(request)
        finally:
            close_old_connections()


def _close_then_wait(every: threading.Barrier) -> None:
    connections.close_all()
    every.wait(timeout=10)
