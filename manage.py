#!/usr/bin/env python
import gc
import os
import sys


def _collect_once_django_is_set_up() -> None:
    """Django's start (settings, every app's models, every ready()) allocates
    hundreds of thousands of objects, none of them garbage, and the cyclic
    collector walked them again and again: a quarter of every command's start
    (each cluster, `up`, every `manage.py jobs` call; `manage.py check` took
    1.7 s, now 1.2 s). Collection stays off until django.setup() returns;
    what was loaded is then frozen (never walked again) and collection runs
    as usual."""
    import django

    setup = django.setup

    def setup_then_collect(*args, **kwargs):
        try:
            return setup(*args, **kwargs)
        finally:
            # What the start loaded lives as long as the process: out of the
            # collector's passes from now on, as Daphne's (config/asgi.py).
            gc.freeze()
            gc.enable()

    django.setup = setup_then_collect
    gc.disable()


if __name__ == "__main__":
    _collect_once_django_is_set_up()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A bad setting from the environment: one line naming it, not a traceback.
        sys.exit(f"Conveyor is not configured correctly: {exc}")
