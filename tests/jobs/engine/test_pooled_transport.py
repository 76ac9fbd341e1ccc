"""jobs/engine/pooled_transport.py: httpx transports on an httpcore pool of our
own raise what httpx's own transports raise."""

from __future__ import annotations

import httpcore
import httpx
import pytest
from httpx._transports.default import map_httpcore_exceptions

from jobs.engine.pooled_transport import httpx_errors

HTTPCORE_ERRORS = [
    getattr(httpcore, name)
    for name in dir(httpcore)
    if isinstance(getattr(httpcore, name), type) and issubclass(getattr(httpcore, name), Exception)
]


@pytest.mark.parametrize("error", HTTPCORE_ERRORS, ids=lambda error: error.__name__)
def test_each_httpcore_error_becomes_the_httpx_error_httpx_itself_raises(error):
    def raised(mapping) -> BaseException:
        try:
            with mapping():
                raise error("boom")
        except Exception as exc:
            return exc
        raise AssertionError("nothing raised")

    ours, theirs = raised(httpx_errors), raised(map_httpcore_exceptions)

    assert type(ours) is type(theirs)
    assert str(ours) == "boom"
    assert issubclass(type(ours), httpx.HTTPError) or ours.__class__ is error


def test_an_error_httpcore_does_not_raise_passes_unchanged():
    with pytest.raises(KeyError), httpx_errors():
        raise KeyError("x")
