"""Content batches on the dashboard: upload + preview, refusals, the batch
page's pages/failures section, retries and exports."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django_q.models import OrmQ

from jobs.content.service import submit_content
from jobs.models import Batch, Job, Page, State
from tests.dashboard.test_views import htmx, run_job

CSV = "keyword,audience\nblue widgets,plumbers\nred widgets,bakers\n"
TEMPLATE = "Write a page about {keyword} for {audience}."


def _form(csv_data: str | bytes | None = CSV, **fields):
    data = {"name": "widgets", "template": TEMPLATE, "provider": "", "model": "", "callback_url": "", **fields}
    if csv_data is not None:
        raw = csv_data.encode() if isinstance(csv_data, str) else csv_data
        data["file"] = SimpleUploadedFile("pages.csv", raw, "text/csv")
    return data


def _nothing_written() -> bool:
    return (Batch.objects.count(), Job.objects.count(), OrmQ.objects.count()) == (0, 0, 0)


def test_the_form_page_renders_with_its_live_preview_wiring(reader_client):
    html = reader_client.get("/batches/content/").content.decode()

    assert 'enctype="multipart/form-data"' in html and 'hx-post="/batches/content/preview"' in html
    assert 'id="content-preview"' in html and 'name="template"' in html and 'name="file"' in html
    assert "default (simulated)" in html
    assert 'href="/batches/content/"' in reader_client.get("/batches/").content.decode()


def test_an_htmx_preview_shows_the_first_prompt_rows_columns_and_fields(operator_client):
    response = operator_client.post("/batches/content/preview", _form(), **htmx())

    html = response.content.decode()
    assert response.status_code == 200
    assert "Write a page about blue widgets for plumbers." in html
    assert "<b>2</b> pages ready to queue" in html
    assert "<code>keyword</code>, <code>audience</code>" in html
    assert "<code>{keyword}</code>, <code>{audience}</code>" in html
    # Each field's (empty) errors are swapped next to it, out of band.
    assert 'id="errors-template" class="field-errors" hx-swap-oob="true"></div>' in html
    assert _nothing_written()


def test_an_htmx_preview_puts_each_error_next_to_its_field(operator_client):
    data = _form("keyword,audience\nsame,a\nSame,b\n", template="About {keyword} for {role}")

    html = operator_client.post("/batches/content/preview", data, **htmx()).content.decode()

    template_errors = html.split('id="errors-template"')[1].split("</div>")[0]
    assert "names {role}, not a column of the file (its columns: keyword, audience)" in template_errors
    file_errors = html.split('id="errors-file"')[1].split("</div>")[0]
    assert "rows[2].keyword: &#x27;Same&#x27; gives the slug &#x27;same&#x27;, as rows[1] does" in file_errors
    assert "Nothing can be queued" in html
    assert _nothing_written()


def test_a_preview_without_javascript_renders_the_page_and_keeps_the_rows(operator_client):
    response = operator_client.post("/batches/content/", {**_form(), "preview": "1"})

    html = response.content.decode()
    assert response.status_code == 200
    assert "<title>" in html and "Write a page about blue widgets for plumbers." in html
    # The file's text is now in the paste field: submitting needs no new file choice.
    assert "blue widgets,plumbers" in html.split('name="csv_text"')[1].split("</textarea>")[0]
    assert _nothing_written()


@pytest.mark.parametrize(
    ("csv_data", "fields", "field", "message"),
    [
        (CSV, {"template": "About {keyword} for {job}"}, "template", "names {job}, not a column of the file"),
        ("topic\nwidgets\n", {}, "file", "has no &#x27;keyword&#x27; column"),
        ("", {}, "file", "is empty"),
        ("keyword,audience\ncaf\xe9,x\n".encode("latin-1"), {}, "file", "is not UTF-8 text"),
        ("keyword,audience\na b,x\nA-B,y\n", {}, "file", "rows[2].keyword"),
        (None, {}, "file", "is required"),
        (CSV, {"name": ""}, "name", "is required to submit"),
        (CSV, {"callback_url": "ftp://x"}, "callback_url", "Enter a valid URL."),
    ],
)
def test_a_bad_submission_is_refused_next_to_its_field_and_nothing_is_queued(
    operator_client, csv_data, fields, field, message
):
    response = operator_client.post("/batches/content/", _form(csv_data, **fields))

    assert response.status_code == 422
    errors = response.content.decode().split(f'id="errors-{field}"')[1].split("</div>")[0]
    assert message in errors
    assert _nothing_written()


def test_too_many_rows_are_refused(operator_client, monkeypatch):
    from jobs.content import service as content

    monkeypatch.setattr(content, "MAX_PAGES", 3)
    rows = "keyword,audience\n" + "".join(f"k{i},a\n" for i in range(4))

    response = operator_client.post("/batches/content/", _form(rows))

    assert response.status_code == 422 and "has more than 3 rows" in response.content.decode()
    assert _nothing_written()


def test_submitting_creates_one_content_page_job_per_row_in_one_batch(operator_client, operator):
    response = operator_client.post("/batches/content/", _form(model="simulated@latency_ms=5"))

    batch = Batch.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/batches/{batch.id}/"
    assert (batch.name, batch.total, batch.owner) == ("widgets", 2, f"user:{operator.pk}")
    jobs = Job.objects.filter(batch=batch)
    assert jobs.count() == 2 and {j.kind for j in jobs} == {"content.page"}
    assert sorted(j.payload["variables"]["keyword"] for j in jobs) == ["blue widgets", "red widgets"]
    assert {j.payload["model"] for j in jobs} == {"simulated@latency_ms=5"}
    assert OrmQ.objects.filter(key="llm").count() == 2


def test_pasted_rows_submit_like_a_file(operator_client):
    operator_client.post("/batches/content/", {**_form(None), "csv_text": CSV})

    assert Job.objects.filter(kind="content.page").count() == 2


# --- the batch page -------------------------------------------------------------


@pytest.fixture
def content_batch(db):
    batch = submit_content("widgets", "keyword\n" + "".join(f"topic {i}\n" for i in range(4)), "About {keyword}").batch
    jobs = sorted(Job.objects.filter(batch=batch), key=lambda j: j.payload["variables"]["keyword"])
    for job in jobs[:2]:
        run_job(job, outcome="succeeded", result={})
        keyword = job.payload["variables"]["keyword"]
        Page.objects.create(
            batch=batch,
            job=job,
            slug=keyword.replace(" ", "-"),
            keyword=keyword,
            title=f"All about {keyword}",
            meta_description=f"=cmd about {keyword}",
            body_markdown=f"# All about {keyword}\n\nText.",
            word_count=5,
            simulated=True,
        )
    run_job(jobs[2], error_type="ProviderRejected", message="model not found")
    return batch


def test_the_batch_page_shows_pages_done_failures_and_export_buttons(operator_client, content_batch):
    html = operator_client.get(f"/batches/{content_batch.id}/").content.decode()

    assert "<b>2</b> of 4 pages done" in html and "10 words" in html
    assert "All about topic 0" in html and "All about topic 1" in html
    assert f'href="/batches/{content_batch.id}/pages/topic-0/"' in html
    assert "ProviderRejected" in html and "model not found" in html and "Retry all 1 failed" in html
    for fmt in ("csv", "json", "zip"):
        assert f'href="/batches/{content_batch.id}/export.{fmt}"' in html
    # The section refreshes itself when the stream says the batch moved.
    assert f'hx-trigger="sse:batch-summary-{content_batch.id} throttle:2s' in html
    assert html.count('<tr id="job-') == 4  # the jobs table is still there


def test_readers_see_failures_without_retry_buttons_and_may_not_retry(reader_client, content_batch):
    html = reader_client.get(f"/batches/{content_batch.id}/").content.decode()

    assert "ProviderRejected" in html and "Retry" not in html
    assert reader_client.post(f"/batches/{content_batch.id}/retry").status_code == 403
    assert Job.objects.filter(batch=content_batch, state=State.DEAD).count() == 1


def test_an_operator_retries_one_failed_job(operator_client, content_batch):
    dead = Job.objects.get(batch=content_batch, state=State.DEAD)

    response = operator_client.post(f"/batches/{content_batch.id}/retry", {"job": str(dead.id)}, **htmx())

    assert response.status_code == 200 and "Queued job" in response.content.decode()
    assert response["HX-Trigger"] == "batch-content-changed"
    assert Job.objects.get(id=dead.id).state == State.QUEUED


def test_an_operator_retries_all_failed_jobs_of_the_batch_and_no_other(operator_client, content_batch, make_job):
    other = make_job()
    run_job(other)
    second = Job.objects.filter(batch=content_batch, state=State.QUEUED).first()
    run_job(second, error_type="ProviderRejected")

    response = operator_client.post(f"/batches/{content_batch.id}/retry")

    assert response.status_code == 302 and response["Location"] == f"/batches/{content_batch.id}/"
    assert Job.objects.filter(batch=content_batch, state=State.DEAD).count() == 0
    assert Job.objects.get(id=other.id).state == State.DEAD
    assert "Queued 2 failed jobs again." in operator_client.get(response["Location"]).content.decode()


def test_retrying_a_job_of_another_batch_is_not_found(operator_client, content_batch, make_job):
    other = make_job()
    run_job(other)

    assert operator_client.post(f"/batches/{content_batch.id}/retry", {"job": str(other.id)}).status_code == 404
    assert operator_client.post(f"/batches/{content_batch.id}/retry", {"job": "nope"}).status_code == 404
    assert Job.objects.get(id=other.id).state == State.DEAD


def test_the_live_fragment_and_a_page_s_markdown(operator_client, content_batch):
    fragment = operator_client.get(f"/batches/{content_batch.id}/content", **htmx()).content.decode()
    assert fragment.startswith('<section id="batch-content"') and "All about topic 1" in fragment

    page = operator_client.get(f"/batches/{content_batch.id}/pages/topic-1/").content.decode()
    assert "All about topic 1" in page and "simulated" in page and "title: &quot;All about topic 1&quot;" in page

    raw = operator_client.get(f"/batches/{content_batch.id}/pages/topic-1/?format=md")
    assert raw["Content-Type"] == "text/markdown; charset=utf-8"
    assert raw.content.decode().startswith('---\ntitle: "All about topic 1"\n')
    assert operator_client.get(f"/batches/{content_batch.id}/pages/nope/").status_code == 404


def test_the_dashboard_exports_parse_back_to_the_pages(reader_client, content_batch):
    base = f"/batches/{content_batch.id}/export"

    csv_response = reader_client.get(base + ".csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(csv_response.streaming_content).decode())))
    records = json.loads(b"".join(reader_client.get(base + ".json").streaming_content))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(reader_client.get(base + ".zip").streaming_content)))

    assert csv_response["Content-Disposition"].startswith('attachment; filename="widgets-')
    assert [(r["slug"], r["title"], r["description"]) for r in rows] == [
        ("topic-0", "All about topic 0", "'=cmd about topic 0"),
        ("topic-1", "All about topic 1", "'=cmd about topic 1"),
    ]
    assert [(r["slug"], r["description"]) for r in records] == [
        ("topic-0", "=cmd about topic 0"),
        ("topic-1", "=cmd about topic 1"),
    ]
    assert archive.namelist() == ["topic-0.md", "topic-1.md"]
    assert archive.read("topic-0.md").decode().endswith("---\n\n# All about topic 0\n\nText.\n")
    assert reader_client.get(base + ".xlsx").status_code == 404


def test_a_batch_of_other_jobs_has_no_content_section(operator_client, make_job):
    batch = Batch.objects.create(name="plain", total=1)
    make_job(batch=batch)

    assert 'id="batch-content"' not in operator_client.get(f"/batches/{batch.id}/").content.decode()


@pytest.mark.parametrize("template", ["About {keyword:>50}", "About {keyword!r}", "About {keyword:{audience}}"])
def test_a_template_with_a_format_spec_or_conversion_is_refused_on_the_form(operator_client, template):
    for data in (_form(template=template), {**_form(template=template), "preview": "1"}):
        response = operator_client.post("/batches/content/", data)

        assert response.status_code == 422
        errors = response.content.decode().split('id="errors-template"')[1].split("</div>")[0]
        assert "only plain {column} placeholders" in errors
    html = operator_client.post("/batches/content/preview", _form(template=template), **htmx()).content.decode()
    assert "only plain {column} placeholders" in html.split('id="errors-template"')[1].split("</div>")[0]
    assert _nothing_written()
