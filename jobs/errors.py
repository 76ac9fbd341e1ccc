"""Errors raised by the engine's public functions and by handlers."""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of the errors every entry point turns into a clear message."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJob(ConveyorError):
    """The submission is refused; `errors` lists each problem with its field path."""

    code = "invalid-job"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class UnknownKind(InvalidJob):
    code = "unknown-kind"


class PayloadTooLarge(InvalidJob):
    code = "payload-too-large"


class IdempotencyKeyReused(ConveyorError):
    """The idempotency key was used before with a different request."""

    code = "idempotency-key-reused"

    def __init__(self, job_id) -> None:
        self.job_id = job_id
        super().__init__(f"idempotency key already used for job {job_id} with a different request; use a new key")


class JobNotFound(ConveyorError):
    code = "job-not-found"


class InvalidState(ConveyorError):
    """The operation does not apply to the job in its current state."""

    code = "invalid-state"


# --- raised by handlers ---------------------------------------------------


class PermanentError(Exception):
    """Retrying cannot help: the job goes straight to the dead-letter queue."""


class RetryableError(Exception):
    """A transient failure: retry with backoff, or after `retry_after` seconds.

    With `count_attempt=False` (throttling, e.g. HTTP 429) the attempt is not
    counted against `max_attempts`.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None, count_attempt: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.count_attempt = count_attempt


class Cancelled(Exception):
    """Raised inside a handler when an operator cancelled the running job."""


class LeaseLost(Exception):
    """Raised inside a handler when its job was taken from it (lease expired)."""
