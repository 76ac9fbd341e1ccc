"""Prompt templates: `Write about {keyword} for {audience}.` filled from one row
of variables.

A template may hold only plain `{column}` placeholders (and `{{`/`}}` for a
literal brace). str.format's format specs, conversions and attribute or index
access are refused: `{keyword:>2000000000}` alone would render a 2 GB prompt.
The length of a prompt is worked out before it is built, so an oversized one
is refused without being made.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from typing import Any

MAX_PROMPT = 100_000  # characters of a rendered prompt
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_ -]*")
Pieces = list[tuple[str, str | None]]  # (literal text, placeholder or None)
_PLAIN = "only plain {column} placeholders are allowed (write a literal brace as {{ or }})"


class TemplateError(ValueError):
    """The template is malformed or uses more than plain placeholders."""


class PromptTooLong(ValueError):
    """The template filled from these variables is over MAX_PROMPT characters."""


def parse_template(template: str) -> Pieces:
    """(literal text, placeholder or None) pairs; raises TemplateError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"is malformed: {exc} (write a literal brace as {{{{ or }}}})") from None
    pieces: Pieces = []
    for literal, field, spec, conversion in parsed:
        if field is not None:
            if conversion is not None:
                raise TemplateError(f"placeholder {{{field}!{conversion}}} has a conversion; {_PLAIN}")
            if spec:
                raise TemplateError(f"placeholder {{{field}:{spec}}} has a format spec; {_PLAIN}")
            if not _COLUMN.fullmatch(field):
                raise TemplateError(f"placeholder {{{field}}} is not a column name; {_PLAIN}")
        pieces.append((literal, field))
    return pieces


def prompt_length(pieces: Pieces, variables: Mapping[str, Any]) -> int:
    """The length `render_prompt` would give, without building the prompt."""
    literal = sum(len(text) for text, _ in pieces)
    uses = Counter(field for _, field in pieces if field is not None)
    return literal + sum(count * len(_text(variables.get(field))) for field, count in uses.items())


def check_length(pieces: Pieces, variables: Mapping[str, Any]) -> None:
    """Raises PromptTooLong."""
    length = prompt_length(pieces, variables)
    if length > MAX_PROMPT:
        raise PromptTooLong(f"makes a prompt of {length:,} characters; at most {MAX_PROMPT:,}")


def render_prompt(template: str, variables: Mapping[str, Any]) -> str:
    """The template filled from the variables (a missing or None one is empty).
    Raises TemplateError or PromptTooLong."""
    pieces = parse_template(template)
    check_length(pieces, variables)
    return "".join(text + (_text(variables.get(field)) if field is not None else "") for text, field in pieces)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
