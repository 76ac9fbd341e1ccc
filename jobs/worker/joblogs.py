"""What a running job logs, kept with its attempt and shown live.

One `logging.Handler` on the root logger (installed once per worker process)
hands each record to the job whose capture is current in the context the
record was emitted in: the worker thread's for a sync job, the asyncio task's
for a job in the lane (each task runs in a context of its own). Handlers may
also call `ctx.log(...)`. A job keeps its last `MAX_LINES` lines, at most
`MAX_BYTES`; the lines not yet written go out with the job's next progress
flush (one statement for any number of lines and jobs).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

MAX_LINES = 1000
MAX_BYTES = 64 * 1024
MAX_LINE = 2000  # characters of one line

_current: contextvars.ContextVar[JobLog | None] = contextvars.ContextVar("conveyor_job_log", default=None)
_install_lock = threading.Lock()


class JobLog:
    """One attempt's log lines: bounded, with what is not yet flushed."""

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._size = 0
        self.count = 0  # lines ever added; the n-th line added is number n-1
        self._flushed = 0
        self._lock = threading.Lock()
        self.on_add = None  # called after each line (the lane schedules a flush)

    def add(self, line: str) -> None:
        line = line[:MAX_LINE]
        with self._lock:
            self._lines.append(line)
            self._size += len(line.encode()) + 1
            self.count += 1
            while len(self._lines) > MAX_LINES or (self._size > MAX_BYTES and len(self._lines) > 1):
                self._size -= len(self._lines.popleft().encode()) + 1
        if self.on_add is not None:
            self.on_add()

    @property
    def changed(self) -> bool:
        return self.count != self._flushed

    def mark(self) -> int:
        return self._flushed

    def rewind(self, mark: int) -> None:
        """Undo the takes since `mark` (their write failed)."""
        with self._lock:
            self._flushed = mark

    def text(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def take(self) -> tuple[str | None, tuple[str, ...], int]:
        """(all lines kept, the new lines since the last take, the number of
        the first of them); (None, (), count) when nothing changed."""
        with self._lock:
            if self.count == self._flushed:
                return None, (), self.count
            first_kept = self.count - len(self._lines)
            first = max(self._flushed, first_kept)
            new = tuple(self._lines)[first - first_kept :]
            self._flushed = self.count
            return "\n".join(self._lines), new, first

    def log(self, message: str, level: int = logging.INFO, name: str = "job") -> None:
        """Add a line as a record logged inside the job would give it (`ctx.log`)."""
        self.add(FORMATTER.format(logging.LogRecord(name, level, "", 0, message, None, None)))


FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


class _CaptureHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        joblog = _current.get()
        if joblog is None:
            return
        try:
            joblog.add(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never fail the job
            self.handleError(record)


_HANDLER = _CaptureHandler(level=logging.INFO)
_HANDLER.setFormatter(FORMATTER)


def install() -> None:
    """Make sure the capturing handler is on the root logger (a logging
    reconfiguration, `dictConfig`, replaces the root's handlers)."""
    root = logging.getLogger()
    if _HANDLER not in root.handlers:
        with _install_lock:
            if _HANDLER not in root.handlers:
                root.addHandler(_HANDLER)


@contextmanager
def capture(joblog: JobLog) -> Iterator[None]:
    """Records emitted inside the block (in this context) go to `joblog`."""
    install()
    token = _current.set(joblog)
    try:
        yield
    finally:
        _current.reset(token)


def start_capture(joblog: JobLog) -> None:
    """For an asyncio task's own context: capture its records from now on."""
    install()
    _current.set(joblog)
