"""Reading request bodies and query strings: media type, size, JSON, and text
Postgres can store.

Postgres refuses NUL characters and unpaired surrogates in text and jsonb, and
JSON's NaN/Infinity in jsonb; refusing them here turns what would be a
database error (a 500) into a 400/422 that names the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.http import HttpRequest
from django.utils.datastructures import MultiValueDict
from ninja.parser import Parser

from jobs.api.problems import Problem, field_path

MiB = 1024 * 1024
MAX_BODY = 1 * MiB
MAX_BATCH_BODY = 20 * MiB


class ApiParser(Parser):
    """django-ninja's parser with our limits; what it raises ends as a problem."""

    def parse_body(self, request: HttpRequest) -> Any:
        require_media_type(request, "application/json")
        if len(request.body) > MAX_BODY:
            raise Problem("request-too-large", "The body is over 1 MiB.")
        return loads(request.body)

    def parse_querydict(self, data: MultiValueDict, list_fields: list[str], request: HttpRequest) -> dict[str, Any]:
        result = super().parse_querydict(data, list_fields, request)
        check_text(result, prefix=("query",))
        return result


def media_type(request: HttpRequest) -> str:
    return (request.content_type or "").lower()


def is_json(request: HttpRequest) -> bool:
    kind = media_type(request)
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def require_media_type(request: HttpRequest, *accepted: str) -> str:
    """The request's media type, which must be one of `accepted` (JSON types count as application/json)."""
    kind = "application/json" if is_json(request) else media_type(request)
    if kind not in accepted:
        raise Problem(
            "unsupported-media-type",
            f"The body must be {' or '.join(accepted)}, not {media_type(request) or 'unlabelled'}.",
        )
    return kind


def check_length(request: HttpRequest, *, limit: int) -> None:
    """Refuse a body whose declared length is over `limit`, before reading it."""
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if declared.isdigit() and int(declared) > limit:
        raise Problem("request-too-large", f"The body is over {limit // MiB} MiB.")


def read_body(request: HttpRequest, *, limit: int) -> bytes:
    """The raw body, at most `limit` bytes. Read from the stream: Django's
    request.body would stop at its own 2.5 MiB cap (DATA_UPLOAD_MAX_MEMORY_SIZE)."""
    check_length(request, limit=limit)
    body = request.read(limit + 1)
    if len(body) > limit:
        raise Problem("request-too-large", f"The body is over {limit // MiB} MiB.")
    return body


def loads(body: bytes | str) -> Any:
    """Parse JSON strictly (no NaN/Infinity, no numbers that overflow to them)."""
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Problem("malformed-json", f"The body is not valid JSON: {exc}") from None
    check_text(value)
    return value


def check_text(value: Any, *, prefix: tuple[Any, ...] = ()) -> None:
    """Refuse strings Postgres cannot store, naming where they are."""
    errors: list[dict[str, str]] = []
    _walk(value, prefix, errors)
    if errors:
        raise Problem("validation-error", "Some fields hold text that cannot be stored.", errors=errors[:20])


def _walk(value: Any, path: tuple[Any, ...], errors: list[dict[str, str]]) -> None:
    if isinstance(value, str):
        problem = _text_problem(value)
        if problem:
            errors.append({"field": field_path(path) or "body", "message": problem})
    elif isinstance(value, dict):
        for key, item in value.items():
            if _text_problem(key):
                errors.append({"field": field_path(path) or "body", "message": f"has a key that {_text_problem(key)}"})
            _walk(item, (*path, key), errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, (*path, index), errors)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate, which is not valid Unicode"
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range for a number")
    return number
