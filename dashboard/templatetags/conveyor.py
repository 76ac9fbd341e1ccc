"""Template helpers of the dashboard: times, ids, JSON, titles."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()


@register.filter
def reltime(value: datetime | None) -> str:
    """`<time>` showing "3 s ago" (or "in 20 s"), the absolute time on hover;
    static/conveyor.js keeps the text current."""
    if not value:
        return "–"
    return format_html(
        '<time datetime="{}" title="{}" data-relative>{}</time>',
        value.isoformat(),
        timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z"),
        relative(value),
    )


def relative(value: datetime, now: datetime | None = None) -> str:
    seconds = ((now or timezone.now()) - value).total_seconds()
    text = duration(abs(seconds), coarse=True)
    if abs(seconds) < 1:
        return "just now"
    return f"{text} ago" if seconds > 0 else f"in {text}"


@register.filter
def duration(seconds: float | None, coarse: bool = False) -> str:
    """12 s, 4 min 2 s, 3 h 5 min, 2 d 4 h (one unit only when `coarse`)."""
    if seconds is None:
        return "–"
    seconds = int(round(float(seconds)))
    for size, unit, smaller, smaller_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if seconds >= size:
            major, rest = divmod(seconds, size)
            minor = rest // smaller
            if coarse or not minor:
                return f"{major} {unit}"
            return f"{major} {unit} {minor} {smaller_unit}"
    return f"{seconds} s"


@register.filter
def short_id(value: Any) -> str:
    return str(value)[:8]


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@register.simple_tag
def page_title(title: str, dead: int | None = None) -> str:
    """ "(3 dead) Jobs · Conveyor": the dead-letter count leads every title."""
    prefix = f"({dead} dead) " if dead else ""
    return f"{prefix}{title} · Conveyor" if title else f"{prefix}Conveyor"


@register.filter
def get_item(mapping: dict, key: Any) -> Any:
    return mapping.get(key) if mapping else None


@register.filter
def total(items: list[dict], key: str) -> float:
    return sum(item.get(key) or 0 for item in items or [])


@register.filter
def took(start: datetime | None, end: datetime | None) -> str:
    """How long from `start` to `end`: "1.4 s", "3 min 2 s"."""
    if not start or not end:
        return "–"
    seconds = (end - start).total_seconds()
    return f"{seconds:.1f} s" if seconds < 10 else duration(seconds)


@register.filter
def ms(value: float | None) -> str:
    """Milliseconds as "850 ms", "2.4 s" or "3.1 min"; "–" for none."""
    if value is None:
        return "–"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 60_000:.1f} min"
