"""Daphne's requests skip Twisted's form parsing.

Twisted's `Request.requestReceived` parses the body of every POST whose
Content-Type is a form (`application/x-www-form-urlencoded`, or
`multipart/form-data` through the `email` package, whole), and to decide that
it parses every POST's Content-Type header with `email` too: about a tenth of
Daphne's CPU per API submission. Daphne never reads what this produces
(`request.args`): it hands the raw body to the ASGI application, and Django
parses forms itself. A multipart body Twisted cannot parse (which Django can)
was even answered 400 before Django saw it.

`install()` builds Daphne's requests with `parsePOSTFormSubmission=False`,
Twisted's own switch for this.
"""

from __future__ import annotations

from daphne.http_protocol import WebRequest

_installed = False


def install() -> None:
    """Patch `daphne.http_protocol.WebRequest` (idempotent)."""
    global _installed
    if _installed:
        return
    original = WebRequest.__init__

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    WebRequest.__init__ = __init__
    _installed = True
