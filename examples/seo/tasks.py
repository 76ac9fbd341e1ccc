"""The SEO app's job kinds. Conveyor imports every installed app's `tasks`
module at start-up, in every process, so these register everywhere.

Offline by design: the page's HTML comes with the payload (a crawler of your
own would fetch it with httpx, Conveyor's only outbound HTTP client).
"""

from __future__ import annotations

from html.parser import HTMLParser

from django.db import transaction
from pydantic import Field, HttpUrl

from jobs import Payload, PermanentError, handler, submit


class Page(Payload):
    url: HttpUrl
    html: str = Field(max_length=200_000)


class Site(Payload):
    pages: list[Page] = Field(min_length=1, max_length=100)


@handler("seo.audit_page", schema=Page, queue="default", max_attempts=3, timeout=60)
def audit_page(ctx, payload: Page) -> dict:
    """Audit one page's HTML: title, meta description, headings, image alt texts."""
    from seo.models import PageAudit

    ctx.report_progress(10, "parsing")
    found = _Outline()
    found.feed(payload.html)
    if found.tags == 0:
        raise PermanentError("the page has no HTML tags")
    problems = audit(found)
    score = max(0, 100 - 20 * len(problems))
    PageAudit.objects.update_or_create(
        job_id=ctx.job_id, defaults={"url": str(payload.url), "score": score, "problems": problems}
    )
    return {"url": str(payload.url), "score": score, "problems": problems}


@handler("seo.audit_site", schema=Site, queue="default", max_attempts=3, timeout=60)
def audit_site(ctx, payload: Site) -> dict:
    """Audit every page of a site: one seo.audit_page job per page."""
    with transaction.atomic():  # every page's job, or none
        ids = [
            str(submit("seo.audit_page", page.model_dump(mode="json"), idempotency_key=f"{ctx.job_id}:{n}").id)
            for n, page in enumerate(payload.pages)
        ]
    return {"jobs": ids}


def audit(found: _Outline) -> list[str]:
    problems = []
    if not 10 <= len(found.title) <= 60:
        problems.append(f"title is {len(found.title)} characters; aim for 10-60")
    if not found.description:
        problems.append("no meta description")
    if found.h1 != 1:
        problems.append(f"{found.h1} <h1> headings; use exactly one")
    if found.images_without_alt:
        problems.append(f"images without alt text: {found.images_without_alt}")
    return problems


class _Outline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags = self.h1 = self.images_without_alt = 0
        self.title = self.description = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.tags += 1
        self._in_title = tag == "title"
        if tag == "h1":
            self.h1 += 1
        elif tag == "img" and not (named.get("alt") or "").strip():
            self.images_without_alt += 1
        elif tag == "meta" and (named.get("name") or "").lower() == "description":
            self.description = (named.get("content") or "").strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data.strip()
