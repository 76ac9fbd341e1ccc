"""The one gate every patch of a third-party internal goes through.

A patch replaces or leans on code a library never promised to keep. Each is
written for exact versions: `guarded()` compares the installed versions with
those, installs the patch when they match and otherwise logs one warning line
and leaves the library alone, so an upgrade costs the patch's speed-up, never
a broken process. The patches are listed in docs/ARCHITECTURE.md ("Patches of
third-party internals"); each has a test that fails when the internal it
patches changes shape.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Collection, Mapping

log = logging.getLogger(__name__)

# name -> installed?  A patch is decided once per process.
_decided: dict[str, bool] = {}
_lock = threading.Lock()


def version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def guarded(
    name: str,
    *,
    package: str,
    versions: Collection[str],
    install: Callable[[], object],
    also: Mapping[str, Collection[str]] | None = None,
) -> bool:
    """Run `install()` when `package` (and every package in `also`) is at one of
    the versions the patch was written for; else log one warning and skip it.
    Idempotent per `name`; True when the patch is installed."""
    decided = _decided.get(name)
    if decided is not None:  # the hot path (a cursor per statement asks)
        return decided
    with _lock:
        if name in _decided:
            return _decided[name]
        wanted = {package: versions, **(also or {})}
        found = {pkg: version(pkg) for pkg in wanted}
        mismatched = {pkg: v for pkg, v in found.items() if v not in wanted[pkg]}
        if mismatched:
            log.warning(
                "patch %s not installed: written for %s, found %s; using the library's own behaviour",
                name,
                ", ".join(f"{pkg} {'/'.join(wanted[pkg])}" for pkg in mismatched),
                ", ".join(f"{pkg} {v or 'missing'}" for pkg, v in mismatched.items()),
            )
            _decided[name] = False
            return False
        install()
        _decided[name] = True
        return True


def installed(name: str) -> bool:
    """Whether the patch `name` was installed in this process."""
    return _decided.get(name, False)
