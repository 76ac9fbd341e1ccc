"""The guard on the runner's settling of its own broker rows.

jobs/worker/runner.py listens to Django-Q2's `pre_execute` signal to learn the
broker row a worker is running (`task["ack_id"]`), settles the row in its own
statements and takes `ack_id` off the task so that Django-Q2's monitor has no
acknowledgement left to make. That leans on Django-Q2 1.11.1 internals: the
worker sends `pre_execute` with the very task dict it later puts on the result
queue, and the monitor acknowledges only `task.pop("ack_id")`.

On any other Django-Q2 the runner's receiver is replaced by one that notes
nothing (one warning; config/server/patching.py): the runner then sees no
delivery, and the monitor acknowledges every row as Django-Q2 always does.
"""

from __future__ import annotations

from django_q.signals import pre_execute

from config.server.patching import guarded

NAME = "django-q2-ack-id"
PACKAGE = "django-q2"
VERSIONS = ("1.11.1",)

# The dispatch_uid the runner connects its receiver under.
RUNNER_RECEIVER = "conveyor-runner-delivery"


def install() -> bool:
    """True when the runner may settle its rows; else its receiver is muted."""
    if guarded(NAME, package=PACKAGE, versions=VERSIONS, install=lambda: None):
        return True
    # A signal keeps the first receiver connected under a dispatch_uid, so the
    # runner's own (connected when it is imported, maybe later) is ignored.
    pre_execute.disconnect(dispatch_uid=RUNNER_RECEIVER)
    pre_execute.connect(_note_nothing, dispatch_uid=RUNNER_RECEIVER, weak=False)
    return False


def _note_nothing(sender, **kwargs) -> None:
    pass
