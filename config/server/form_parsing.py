"""Daphne's requests skip Twisted's form parsing.

Twisted's `Request.requestReceived` parses the body of every POST whose
Content-Type is a form (`application/x-www-form-urlencoded`, or
`multipart/form-data` through the `email` package, whole), and to decide that
it parses every POST's Content-Type header with `email` too, a visible share
of Daphne's CPU per API submission. Daphne never reads what this produces
(`request.args`): it hands the raw body to the ASGI application, and Django
parses forms itself. A multipart body Twisted cannot parse (which Django can)
was even answered 400 before Django saw it.

`install()` builds Daphne's requests with `parsePOSTFormSubmission=False`,
Twisted's own switch for this.

Written for daphne 4.2.3 (`WebRequest.__init__(self, *args, **kwargs)` passing
them on to Twisted's `Request`) with Twisted 26.10.0 (`parsePOSTFormSubmission`,
kept as `_parsePOSTFormSubmission`); on other versions Twisted parses forms as
before (config/server/patching.py).
"""

from __future__ import annotations

import functools

from daphne.http_protocol import WebRequest

from config.server.patching import guarded

NAME = "daphne-form-parsing"
PACKAGE = "daphne"
VERSIONS = ("4.2.3",)
ALSO = {"Twisted": ("26.10.0",)}


def install() -> bool:
    """Patch `daphne.http_protocol.WebRequest` on the versions it was written
    for (idempotent); True when installed."""
    return guarded(NAME, package=PACKAGE, versions=VERSIONS, also=ALSO, install=lambda: _install())


def _install() -> None:
    original = WebRequest.__init__
    if hasattr(original, "__wrapped__"):
        return  # already ours

    # wraps: the original stays reachable (inspect.unwrap) for the shape test.
    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    WebRequest.__init__ = __init__
