"""`{% batch_content batch %}`: the pages, failures and exports section of a
content batch's page, rendered with the same context as its live refresh
(dashboard.content.batch_content)."""

from __future__ import annotations

from django import template
from django.template.loader import render_to_string

register = template.Library()


@register.simple_tag(takes_context=True)
def batch_content(context, batch) -> str:
    from dashboard.content import batch_content_context

    request = context["request"]
    return render_to_string(
        "dashboard/batch_content.html#batch-content", batch_content_context(request, batch), request=request
    )
