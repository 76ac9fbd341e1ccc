"""`CONVEYOR_APPS`: the Django apps of your own that Conveyor loads after its own.

Read from the environment by config/settings.py. Each entry is what
INSTALLED_APPS takes: a package (`seo`) or the dotted path of its AppConfig
(`seo.apps.SeoConfig`). A bad entry stops the start with one line naming it,
before Django imports anything of it.
"""

from __future__ import annotations

import importlib.util
import re

from django.core.exceptions import ImproperlyConfigured

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_apps(raw: str | None, installed: list[str]) -> list[str]:
    """The apps `raw` (comma-separated) names, in its order. Raises
    ImproperlyConfigured for an entry that is not a dotted path, is given
    twice or is already installed, or whose top-level package cannot be found
    on the Python path (only the top level is looked for: finding a
    submodule would import its package before Django is set up)."""
    if raw is None:
        return []
    apps: list[str] = []
    for entry in (item.strip() for item in raw.split(",")):
        if not entry:
            continue
        if not _DOTTED.match(entry):
            raise ImproperlyConfigured(
                f"CONVEYOR_APPS entry {entry!r} is not a dotted Python path (e.g. 'seo' or 'seo.apps.SeoConfig')"
            )
        if entry in apps or entry in installed:
            raise ImproperlyConfigured(f"CONVEYOR_APPS entry {entry!r} is given twice or is one of Conveyor's own apps")
        top = entry.split(".")[0]
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError) as exc:
            raise ImproperlyConfigured(f"CONVEYOR_APPS entry {entry!r} cannot be looked up: {exc}") from None
        if found is None:
            raise ImproperlyConfigured(
                f"CONVEYOR_APPS entry {entry!r}: no module named {top!r} on the Python path "
                "(add the folder that contains it to PYTHONPATH)"
            )
        apps.append(entry)
    return apps
