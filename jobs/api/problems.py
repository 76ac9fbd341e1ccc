"""Problem details (RFC 9457): the one shape of every 4xx and 5xx under /api/.

Errors reach a client by three roads, and each ends here:
1. exceptions raised in an operation (ours, the engine's, django-ninja's)
   go through the handlers `install` registers on the NinjaAPI;
2. what django-ninja answers by itself outside an operation (405) and any
   exception that escapes it go through `ensure_problem`, which wraps every
   API URL;
3. unknown routes under /api/ end at `not_found`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from ninja.errors import AuthenticationError, AuthorizationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError

from jobs.engine.batches import BatchNotFound
from jobs.errors import IdempotencyKeyReused, InvalidJob, InvalidState, JobNotFound

log = logging.getLogger("jobs.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "/api/v1/problems/"

# code -> (status, title, what it means)
PROBLEMS: dict[str, tuple[int, str, str]] = {
    "bad-request": (400, "Bad request", "The request cannot be read."),
    "malformed-json": (400, "Malformed JSON", "The body is not valid JSON (NaN and Infinity are not JSON)."),
    "invalid-idempotency-key": (400, "Invalid Idempotency-Key", "The Idempotency-Key header must be 1-255 characters."),
    "not-authenticated": (
        401,
        "Not authenticated",
        "Send `Authorization: Bearer <API key>` with an active key, or log in to the dashboard.",
    ),
    "forbidden": (403, "Forbidden", "The API key or user lacks the scope this operation needs."),
    "csrf-failed": (
        403,
        "CSRF check failed",
        "A request authenticated by the session cookie must carry the CSRF token (X-CSRFToken header).",
    ),
    "not-found": (404, "Not found", "There is nothing at this URL."),
    "job-not-found": (404, "Job not found", "No job has this id."),
    "batch-not-found": (404, "Batch not found", "No batch has this id."),
    "schedule-not-found": (404, "Schedule not found", "No schedule of yours has this name."),
    "method-not-allowed": (405, "Method not allowed", "This URL does not accept this method; see the Allow header."),
    "invalid-state": (409, "Invalid state", "The operation does not apply to the job in its current state."),
    "request-too-large": (413, "Request too large", "The body is over the limit: 1 MiB, or 20 MiB for batches."),
    "unsupported-media-type": (
        415,
        "Unsupported media type",
        "Send application/json (batches also take multipart/form-data).",
    ),
    "validation-error": (422, "Validation error", "Some fields are invalid; `errors` names each."),
    "invalid-job": (422, "Invalid job", "The job is refused; `errors` names each field."),
    "unknown-kind": (422, "Unknown kind", "No handler is registered for this kind."),
    "payload-too-large": (422, "Payload too large", "The job's payload is over 256 KiB once encoded as JSON."),
    "invalid-schedule": (422, "Invalid schedule", "The schedule is refused; `errors` names each field."),
    "invalid-batch": (422, "Invalid batch", "The batch is refused, no job was created; `errors` names each row."),
    "idempotency-key-reused": (
        422,
        "Idempotency key reused",
        "The Idempotency-Key was used before with a different request; use a new key.",
    ),
    "internal-error": (500, "Internal error", "Something failed on our side; it has been logged."),
    "unavailable": (503, "Service unavailable", "The database is unreachable or overloaded; retry after Retry-After."),
}
_BY_STATUS = {400: "bad-request", 404: "not-found", 405: "method-not-allowed", 413: "request-too-large"}


class Problem(Exception):
    """Raise to answer with a problem: `Problem("invalid-cursor", "…")`."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(
    code: str,
    detail: str,
    *,
    status: int | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    default_status, title, _ = PROBLEMS[code]
    status = status or default_status
    body = {"type": TYPE_BASE + code, "title": title, "status": status, "detail": detail, "errors": errors or []}
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def render(problem: Problem) -> HttpResponse:
    return problem_response(problem.code, problem.detail, errors=problem.errors, headers=problem.headers)


def field_path(loc: Iterable[Any]) -> str:
    """`("jobs", 3, "payload", "seconds")` -> `jobs[3].payload.seconds`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def pydantic_errors(errors: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """pydantic's errors of a body, each named by its field path (`body` for the whole)."""
    return [{"field": field_path(e["loc"]) or "body", "message": e["msg"]} for e in errors]


def install(api) -> None:
    """Register the handlers that turn every exception into a problem."""
    handlers: dict[type[Exception], Callable[[HttpRequest, Any], HttpResponse]] = {
        Problem: lambda request, exc: render(exc),
        NinjaValidationError: _validation_error,
        HttpError: _http_error,
        Http404: lambda request, exc: problem_response("not-found", "There is nothing at this URL."),
        JobNotFound: lambda request, exc: problem_response("job-not-found", exc.message),
        InvalidState: lambda request, exc: problem_response("invalid-state", exc.message),
        InvalidJob: lambda request, exc: problem_response(exc.code, exc.message, errors=exc.errors),
        IdempotencyKeyReused: lambda request, exc: problem_response("idempotency-key-reused", exc.message),
        BatchNotFound: lambda request, exc: problem_response("batch-not-found", exc.message),
        RequestDataTooBig: lambda request, exc: problem_response("request-too-large", PROBLEMS["request-too-large"][2]),
        MultiPartParserError: lambda request, exc: problem_response("bad-request", f"Malformed multipart body: {exc}"),
        SuspiciousOperation: lambda request, exc: problem_response("bad-request", str(exc)),
        OperationalError: _unavailable,
        Exception: _unexpected,
    }
    for exc_class, handler in handlers.items():
        api.add_exception_handler(exc_class, handler)


def ensure_problem(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Wrap an API view so that whatever it answers with an error is a problem."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            response = view(request, *args, **kwargs)
        except Problem as exc:
            return render(exc)
        except Http404:
            return not_found(request)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return problem_response("internal-error", "Something failed on our side; it has been logged.")
        if response.status_code >= 400 and not response.get("Content-Type", "").startswith(PROBLEM_JSON):
            code = _BY_STATUS.get(response.status_code, "bad-request")
            problem = problem_response(code, PROBLEMS[code][2], status=response.status_code)
            if response.has_header("Allow"):
                problem["Allow"] = response["Allow"]
            return problem
        return response

    return wrapper


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    return problem_response("not-found", f"There is no API route at {request.path}.")


def _validation_error(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    errors = []
    for error in exc.errors:
        source, *loc = error["loc"]
        # The body's fields are named as sent (django-ninja puts the body
        # parameter's name first: drop it); query, path and header
        # parameters with where they were sent ("query.limit").
        path = (field_path(loc[1:]) or "body") if source == "body" else field_path((source, *loc))
        errors.append({"field": path, "message": error["msg"]})
    return problem_response("validation-error", "Some fields are invalid.", errors=errors)


def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # django-ninja wraps whatever its body parser raises in HttpError(400),
    # keeping the original as the cause: our parser raises Problems.
    if isinstance(exc.__cause__, Problem):
        return render(exc.__cause__)
    if isinstance(exc, AuthenticationError):
        return problem_response(
            "not-authenticated",
            "Authentication required: send `Authorization: Bearer <API key>`.",
            headers={"WWW-Authenticate": 'Bearer realm="conveyor"'},
        )
    if isinstance(exc, AuthorizationError):
        return problem_response("forbidden", str(exc))
    if exc.status_code == 400 and exc.__cause__ is not None:
        return problem_response("malformed-json", f"The body is not valid JSON: {exc.__cause__}")
    code = _BY_STATUS.get(exc.status_code, "bad-request")
    return problem_response(code, str(exc), status=exc.status_code)


def _unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    # Connection refused, too many clients, a deadlock or a lock timeout:
    # nothing is wrong with the request, and trying again may work.
    log.warning("database unavailable in %s %s: %s", request.method, request.path, exc)
    return problem_response(
        "unavailable", "The database is unavailable; try again shortly.", headers={"Retry-After": "1"}
    )


def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.error("unexpected error in %s %s", request.method, request.path, exc_info=exc)
    return problem_response("internal-error", "Something failed on our side; it has been logged.")
