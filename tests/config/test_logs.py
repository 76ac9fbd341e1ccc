"""Structured logs: JSON lines with LOG_FORMAT=json, and the job's fields on
every line a job produces, in a worker's thread and in the asyncio lane."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest
from pydantic import Field

from config.logs import ContextFilter, JsonFormatter, PlainFormatter, job_log_context, job_log_contextvars
from jobs.engine.registry import Payload, handler
from jobs.models import Job
from jobs.worker import runner
from tests.conftest import ROOT, process_env, release_lane_connection, wait_until

HANDLER_LOG = logging.getLogger("tests.ops.handler")


class LogPayload(Payload):
    name: str = Field(max_length=50)


@handler("ops.log_sync", schema=LogPayload)
def log_sync(ctx, payload: LogPayload) -> dict:
    """Logs a line (tests)."""
    HANDLER_LOG.warning("working on %s", payload.name)
    return {}


@handler("ops.log_async", schema=LogPayload)
async def log_async(ctx, payload: LogPayload) -> dict:
    """Logs a line before and after waiting (tests)."""
    HANDLER_LOG.warning("starting %s", payload.name)
    await asyncio.sleep(0.3)  # both jobs' tasks interleave on the loop meanwhile
    HANDLER_LOG.warning("finishing %s", payload.name)
    return {}


class JsonLines(logging.Handler):
    """What the console handler writes with LOG_FORMAT=json, parsed back."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def handler_lines():
    lines = JsonLines()
    HANDLER_LOG.addHandler(lines)
    yield lines.lines
    HANDLER_LOG.removeHandler(lines)


def make_record(message: str = "hello %s", *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("tests.ops", logging.WARNING, __file__, 1, message, args or ("world",), exc_info)


def test_a_json_line_has_time_level_logger_message_and_process():
    line = json.loads(JsonFormatter().format(make_record()))
    assert line["level"] == "WARNING"
    assert line["logger"] == "tests.ops"
    assert line["message"] == "hello world"
    assert line["time"].endswith("+00:00")
    assert isinstance(line["process"], int)
    assert "job_id" not in line and "request_id" not in line


def test_a_json_line_carries_the_traceback_of_an_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        line = json.loads(JsonFormatter().format(make_record(exc_info=sys.exc_info())))
    assert "ValueError: boom" in line["exception"]


def test_inside_a_job_context_lines_carry_the_job_fields(make_job):
    job = make_job("demo.noop", queue="llm")
    job.attempts = 2
    record = make_record()
    with job_log_context(job):
        ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert (line["job_id"], line["kind"], line["attempt"], line["queue"]) == (str(job.id), "demo.noop", 2, "llm")
    outside = make_record()
    ContextFilter().filter(outside)
    assert outside.job_id is None


def test_the_plain_format_appends_the_fields_before_a_traceback(make_job):
    job = make_job("demo.noop")
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record(exc_info=sys.exc_info())
    with job_log_context(job):
        ContextFilter().filter(record)
    first, *rest = PlainFormatter().format(record).splitlines()
    assert first.endswith(f"hello world job_id={job.id} kind=demo.noop attempt=0 queue=default")
    assert rest[-1] == "ValueError: boom"


@pytest.mark.django_db
def test_every_line_a_job_logs_in_a_worker_carries_its_fields(make_job, handler_lines):
    job = make_job("ops.log_sync", {"name": "alpha"})
    runner.run_job(str(job.id))
    assert Job.objects.get(id=job.id).state == "succeeded"
    (line,) = handler_lines
    assert line["message"] == "working on alpha"
    assert (line["job_id"], line["kind"], line["attempt"], line["queue"]) == (str(job.id), "ops.log_sync", 1, "default")


def test_concurrent_tasks_keep_their_own_job_fields(make_job, handler_lines):
    jobs = [make_job("ops.log_async", {"name": name}) for name in ("a", "b")]

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(log_async(None, LogPayload(name=name)), context=job_log_contextvars(job))
            for job, name in zip(jobs, ("a", "b"), strict=True)
        ]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    by_message = {line["message"]: line["job_id"] for line in handler_lines}
    assert by_message == {
        "starting a": str(jobs[0].id),
        "finishing a": str(jobs[0].id),
        "starting b": str(jobs[1].id),
        "finishing b": str(jobs[1].id),
    }


@pytest.mark.django_db(transaction=True)
def test_every_line_an_async_job_logs_in_the_lane_carries_its_fields(make_job, handler_lines):
    from jobs.worker.lane import get_lane

    jobs = [make_job("ops.log_async", {"name": name}) for name in ("a", "b")]
    try:
        for job in jobs:  # as a worker does: claim, then hand over to this process's lane
            runner.run_job(str(job.id))
        wait_until(
            lambda: Job.objects.filter(state="succeeded").count() == 2 and not get_lane().tasks,
            timeout=20,
            message="both async jobs to finish",
        )
    finally:
        release_lane_connection()
    fields = {(line["message"], line["job_id"], line["kind"], line["attempt"], line["queue"]) for line in handler_lines}
    assert fields == {
        (f"{step} {name}", str(job.id), "ops.log_async", 1, "default")
        for job, name in zip(jobs, ("a", "b"), strict=True)
        for step in ("starting", "finishing")
    }


def _run_django(code: str, **env: str) -> subprocess.CompletedProcess:
    setup = "import django; django.setup(); "
    return subprocess.run(
        [sys.executable, "-c", setup + code],
        cwd=ROOT,
        env=process_env(DJANGO_SETTINGS_MODULE="config.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.django_db
def test_log_format_json_makes_every_console_line_json():
    done = _run_django("import logging; logging.getLogger('ops').warning('hello %s', 'world')", LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "ops", "hello world")


@pytest.mark.django_db
def test_an_unknown_log_format_is_refused():
    done = _run_django("pass", LOG_FORMAT="xml")
    assert done.returncode != 0
    assert "LOG_FORMAT='xml'" in done.stderr
