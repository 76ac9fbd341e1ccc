"""Import path kept for stored rows: broker rows pickled before the move name
`jobs.runner.run_job`, and the Django-Q2 schedule names `jobs.runner.rescue_expired`."""

from jobs.worker.runner import rescue_expired, run_job  # noqa: F401
