"""Import path kept for stored rows: the Django-Q2 schedule created before the move
names `jobs.retention.purge_finished`."""

from jobs.engine.retention import purge_finished  # noqa: F401
