"""POST /batches/content(/preview) and GET /batches/{id}/pages."""

from __future__ import annotations

import csv
import io
import json
import uuid
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django_q.models import OrmQ

from jobs.content import service as content
from jobs.content.service import submit_content
from jobs.models import Batch, Job, Page
from tests.jobs.api.conftest import BASE, assert_problem

CSV = "keyword,audience,notes\nblue widgets,plumbers,x\nRed Widgets,bakers,y\ngreen widgets,pilots,z\n"
TEMPLATE = "Write a page about {keyword} for {audience}."


def _post(api, path: str, *, csv_data: bytes | str | None = CSV, **fields):
    data = {"template": TEMPLATE, "name": "widgets", **fields}
    if csv_data is not None:
        raw = csv_data.encode() if isinstance(csv_data, str) else csv_data
        data["file"] = SimpleUploadedFile("pages.csv", raw, "text/csv")
    return api.client.post(BASE + path, data, headers=api.headers)


def _nothing_written() -> bool:
    return (Batch.objects.count(), Job.objects.count(), OrmQ.objects.count()) == (0, 0, 0)


def test_it_previews_the_first_prompt_without_creating_anything(api):
    response = _post(api, "/batches/content/preview")

    assert response.status_code == 200, response.content
    assert response.json() == {
        "rows": 3,
        "columns": ["keyword", "audience", "notes"],
        "fields": ["keyword", "audience"],
        "unused_columns": ["notes"],
        "first_prompt": "Write a page about blue widgets for plumbers.",
        "first_slug": "blue-widgets",
    }
    assert _nothing_written()


def test_it_submits_one_content_page_job_per_row_in_one_batch(api):
    response = _post(api, "/batches/content", provider="simulated", model="simulated@latency_ms=10")

    assert response.status_code == 202, response.content
    body = response.json()
    assert response["Location"] == f"/api/v1/batches/{body['id']}"
    assert (body["name"], body["total"], body["counts"]["queued"]) == ("widgets", 3, 3)
    jobs = Job.objects.filter(batch_id=body["id"]).order_by("created_at", "id")
    assert {j.kind for j in jobs} == {"content.page"} and {j.queue for j in jobs} == {"llm"}
    assert sorted(j.payload["variables"]["keyword"] for j in jobs) == ["Red Widgets", "blue widgets", "green widgets"]
    payload = jobs.filter(payload__variables__keyword="Red Widgets").get().payload
    assert payload == {
        "template": TEMPLATE,
        "variables": {"keyword": "Red Widgets", "audience": "bakers"},
        "provider": "simulated",
        "model": "simulated@latency_ms=10",
        "max_tokens": None,
        "fallback": None,
    }
    assert OrmQ.objects.filter(key="llm").count() == 3


def test_the_same_idempotency_key_answers_the_first_batch_again(api):
    def post():
        data = {"template": TEMPLATE, "name": "widgets", "file": SimpleUploadedFile("p.csv", CSV.encode())}
        return api.client.post(BASE + "/batches/content", data, headers={**api.headers, "Idempotency-Key": "k1"})

    first, replay = post(), post()

    assert first.status_code == 202
    assert replay.status_code == 200 and replay["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert (Batch.objects.count(), Job.objects.count()) == (1, 3)


@pytest.mark.parametrize(
    ("csv_data", "template", "field", "message"),
    [
        (CSV, "About {keyword} for {job title}", "template", "names {job title}, not a column of the file"),
        ("topic,audience\nwidgets,plumbers\n", TEMPLATE, "file", "has no 'keyword' column"),
        ("Keyword\nwidgets\n", "About {Keyword}", "file", "found 'Keyword': names are case-sensitive"),
        ("", TEMPLATE, "file", "is empty"),
        ("keyword,audience\n", TEMPLATE, "file", "has a header but no rows"),
        (
            "keyword,audience\ncaf\xe9,x\n".encode("latin-1"),
            TEMPLATE,
            "file",
            "is not UTF-8 text (byte 0xe9 on line 2)",
        ),
        ("keyword,audience\nBlue Widgets,a\nblue widgets,b\n", TEMPLATE, "rows[2].keyword", "as rows[1] does"),
        ("keyword,audience\n,a\n", TEMPLATE, "rows[1].keyword", "is empty"),
        ("keyword,audience\n" + "k" * 301 + ",a\n", TEMPLATE, "rows[1].keyword", "has 301 characters; at most 300"),
        (CSV, "{keyword} {a} {b}", "template", "names {a}, {b}, not columns of the file"),
        ("keyword,audience\nwidgets,a,extra\n", TEMPLATE, "rows[1]", "has 3 cells; the header has 2"),
        (CSV, "Plain prompt", "template", "names no column"),
        (CSV, "About {keyword", "template", "is malformed"),
        (None, TEMPLATE, "file", "is required"),
    ],
)
def test_a_bad_upload_is_refused_before_anything_is_queued(api, csv_data, template, field, message):
    for path in ("/batches/content/preview", "/batches/content"):
        body = assert_problem(_post(api, path, csv_data=csv_data, template=template), 422, "invalid-batch")

        assert any(e["field"] == field and message in e["message"] for e in body["errors"]), body["errors"]
    assert _nothing_written()


def test_too_many_rows_are_refused_with_the_limit(api, monkeypatch):
    monkeypatch.setattr(content, "MAX_PAGES", 5)
    rows = "".join(f"topic {i},x\n" for i in range(6))

    body = assert_problem(_post(api, "/batches/content", csv_data="keyword,audience\n" + rows), 422, "invalid-batch")

    assert body["errors"] == [{"field": "file", "message": "has more than 5 rows (one page each)"}]
    assert _nothing_written()


def test_an_unknown_provider_and_a_missing_name_are_refused(api):
    body = assert_problem(_post(api, "/batches/content", provider="nope"), 422, "invalid-batch")
    assert body["errors"] == [{"field": "provider", "message": "is not configured; known: simulated"}]

    body = assert_problem(_post(api, "/batches/content", name=""), 422, "validation-error")
    assert body["errors"] == [{"field": "name", "message": "is required"}]
    assert _nothing_written()


def test_a_json_body_is_an_unsupported_media_type(api):
    assert_problem(api.post("/batches/content", {"template": TEMPLATE}), 415, "unsupported-media-type")


# --- exports ------------------------------------------------------------------


@pytest.fixture
def batch_with_pages(db):
    batch = submit_content("Widgets & co", CSV, TEMPLATE).batch
    pages = [
        ("blue-widgets", "blue widgets", '=HYPERLINK("http://evil")', 'Blue, "quoted" and\nmultiline.'),
        ("green-widgets", "green widgets", "Green widgets: a guide", "@SUM(A1) starts like a formula."),
        ("red-widgets", "Red Widgets", "Red widgets — ünïcode", "-1 reasons to buy."),
    ]
    for slug, keyword, title, description in pages:
        Page.objects.create(
            batch=batch,
            slug=slug,
            keyword=keyword,
            title=title,
            meta_description=description,
            body_markdown=f"# {title}\n\n{description}\n\nBody of {keyword}.",
            word_count=7,
            simulated=True,
        )
    return batch


def test_the_csv_export_parses_back_to_the_pages_and_defuses_formulas(api, batch_with_pages):
    response = api.get(f"/batches/{batch_with_pages.id}/pages", {"format": "csv"})

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    filename = f"widgets-co-{str(batch_with_pages.id)[:8]}-pages.csv"
    assert response["Content-Disposition"] == f'attachment; filename="{filename}"'
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["slug"] for r in rows] == ["blue-widgets", "green-widgets", "red-widgets"]
    assert rows[0]["title"] == '\'=HYPERLINK("http://evil")'
    assert rows[0]["description"] == 'Blue, "quoted" and\nmultiline.'
    assert rows[1]["description"] == "'@SUM(A1) starts like a formula."
    assert rows[2]["description"] == "'-1 reasons to buy."
    assert rows[2]["title"] == "Red widgets — ünïcode"
    assert rows[2]["markdown"] == "# Red widgets — ünïcode\n\n-1 reasons to buy.\n\nBody of Red Widgets."


def test_the_json_export_parses_back_to_the_pages(api, batch_with_pages):
    response = api.get(f"/batches/{batch_with_pages.id}/pages")  # json is the default

    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith('-pages.json"')
    records = json.loads(b"".join(response.streaming_content))
    expected = [content.page_record(p) for p in Page.objects.filter(batch=batch_with_pages).order_by("slug")]
    for record in expected:
        record["updated_at"] = record["updated_at"].isoformat()
    assert records == expected


def test_the_zip_export_holds_one_markdown_file_per_page_with_front_matter(api, batch_with_pages):
    response = api.get(f"/batches/{batch_with_pages.id}/pages", {"format": "zip"})

    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].endswith('-pages.zip"')
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert archive.testzip() is None
    assert archive.namelist() == ["blue-widgets.md", "green-widgets.md", "red-widgets.md"]
    text = archive.read("blue-widgets.md").decode()
    assert text == (
        "---\n"
        'title: "=HYPERLINK(\\"http://evil\\")"\n'
        'description: "Blue, \\"quoted\\" and\\nmultiline."\n'
        'slug: "blue-widgets"\n'
        'keyword: "blue widgets"\n'
        "---\n\n"
        '# =HYPERLINK("http://evil")\n\nBlue, "quoted" and\nmultiline.\n\nBody of blue widgets.\n'
    )


def test_an_export_reads_past_its_chunk_size_in_slug_order(api, batch_with_pages):
    Page.objects.bulk_create(
        Page(batch=batch_with_pages, slug=f"page-{i:04d}", title=f"Page {i}", body_markdown=f"# Page {i}")
        for i in range(1, 1101)
    )

    records = json.loads(b"".join(api.get(f"/batches/{batch_with_pages.id}/pages").streaming_content))
    archive = zipfile.ZipFile(
        io.BytesIO(b"".join(api.get(f"/batches/{batch_with_pages.id}/pages", {"format": "zip"}).streaming_content))
    )

    assert len(records) == 1103
    assert [r["slug"] for r in records] == sorted(r["slug"] for r in records)
    assert len(archive.namelist()) == len(set(archive.namelist())) == 1103


def test_one_page_reads_as_json(api, batch_with_pages):
    response = api.get(f"/batches/{batch_with_pages.id}/pages/green-widgets")

    assert response.status_code == 200
    assert response.json()["title"] == "Green widgets: a guide"
    assert_problem(api.get(f"/batches/{batch_with_pages.id}/pages/nope"), 404, "not-found")


def test_an_export_of_an_unknown_batch_or_format_is_a_problem(api, batch_with_pages):
    assert_problem(api.get(f"/batches/{uuid.uuid4()}/pages", {"format": "csv"}), 404, "batch-not-found")
    body = assert_problem(api.get(f"/batches/{batch_with_pages.id}/pages", {"format": "xlsx"}), 422)
    assert body["errors"][0]["field"] == "query.format"


def test_a_read_only_key_may_export_but_not_submit(batch_with_pages):
    from jobs.engine.apikeys import create_api_key
    from tests.jobs.api.conftest import ApiClient

    created = create_api_key("reader", scopes=["read"])
    # Its own batch: a key without `operate` exports only what it submitted.
    Batch.objects.filter(id=batch_with_pages.id).update(owner=created.api_key.owner)
    reader = ApiClient(created.key)

    assert reader.get(f"/batches/{batch_with_pages.id}/pages", {"format": "csv"}).status_code == 200
    assert_problem(_post(reader, "/batches/content"), 403, "forbidden")


def test_under_asgi_an_export_streams_from_an_async_iterator_in_chunks(make_key, batch_with_pages):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    Page.objects.bulk_create(
        Page(batch=batch_with_pages, slug=f"page-{i:04d}", title=f"Page {i}", body_markdown="word " * 60)
        for i in range(1, 1001)
    )
    headers = {"Authorization": f"Bearer {make_key()}"}

    async def download():
        response = await AsyncClient().get(f"{BASE}/batches/{batch_with_pages.id}/pages?format=csv", headers=headers)
        return response, [chunk async for chunk in response.streaming_content]

    # async_to_sync: this thread serves the export's database reads, inside the test's transaction.
    response, chunks = async_to_sync(download)()

    assert response.status_code == 200 and response.is_async
    assert len(chunks) > 2, "the export should leave in several chunks, not one buffer"
    assert len(list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))) == 1003


# --- what a template may contain -------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("About {keyword:>50}", "format spec"),
        ("About {keyword:{audience}}", "format spec"),
        ("About {keyword!r}", "conversion"),
        ("About {keyword.upper}", "only plain {column} placeholders"),
        ("About {keyword[0]}", "only plain {column} placeholders"),
    ],
)
def test_a_template_with_more_than_plain_placeholders_is_refused(api, template, message):
    # {keyword:>2000000000} rendered a 2 GB prompt; a narrow spec is refused alike and costs nothing.
    for path in ("/batches/content/preview", "/batches/content"):
        body = assert_problem(_post(api, path, template=template), 422, "invalid-batch")

        assert [e["field"] for e in body["errors"]] == ["template"], body["errors"]
        assert message in body["errors"][0]["message"]
    assert _nothing_written()


def test_doubled_braces_still_write_literal_braces(api):
    response = _post(api, "/batches/content/preview", template="Use {{braces}} for {keyword} }}{{")

    assert response.status_code == 200, response.content
    assert response.json()["first_prompt"] == "Use {braces} for blue widgets }{"


def test_a_row_whose_prompt_would_be_over_the_limit_is_refused(api):
    long_cell = "x" * 60_000
    data = f"keyword,audience\nshort,a\nlong,{long_cell}\n"

    for path in ("/batches/content/preview", "/batches/content"):
        body = assert_problem(_post(api, path, csv_data=data, template="{keyword}: {audience} {audience}"), 422)

        assert body["errors"] == [
            {"field": "rows[2]", "message": "makes a prompt of 120,007 characters; at most 100,000"}
        ]
    assert _nothing_written()


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"template": "{keyword:>50}", "variables": {"keyword": "k"}}, "payload.template", "format spec"),
        ({"template": "{keyword!s}", "variables": {"keyword": "k"}}, "payload.template", "conversion"),
        (
            {"template": "{keyword}" * 20, "variables": {"keyword": "k" * 6000}},
            "payload",
            "at most 100,000",
        ),
    ],
)
def test_a_single_content_page_job_with_a_bad_template_is_refused(api, payload, field, message):
    body = assert_problem(api.post("/jobs", {"kind": "content.page", "payload": payload}), 422, "invalid-job")

    assert [e["field"] for e in body["errors"]] == [field], body["errors"]
    assert message in body["errors"][0]["message"]
    assert _nothing_written()
