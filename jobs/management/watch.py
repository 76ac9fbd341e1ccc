"""`manage.py jobs watch ID`: a job (or a batch) followed in the terminal until
it ends, from the same events the dashboard shows.

Like the hub (dashboard/live/hub.py) it LISTENs on the events channel and
reads the event rows back; it never polls the job row. A notification only
wakes it up: what it shows comes from the events table, read after the last
event seen (re-reading a margin below it now and then, since event ids are
drawn before commit and do not commit in order). The job's state follows
from the event types, its progress from `job.progress`, its streamed text
from `job.output` (appended at its offset) and its log lines from `job.log`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from typing import TextIO
from uuid import UUID

import psycopg
from psycopg.conninfo import make_conninfo

from jobs.db.events import CHANNEL
from jobs.djangoq.broker import listen_params
from jobs.models import FINISHED_STATES, LOG_EVENT, OUTPUT_EVENT, PROGRESS_EVENT, Batch, Job, State

WAKE_SECONDS = 2.0  # re-read (with the margin) at least this often
MARGIN = 1000  # how far below its cursor a re-read starts (see the docstring)
BAR = 24

# The state an event leaves its job in.
_STATE_OF = {
    "job.created": State.QUEUED,
    "job.queued": State.QUEUED,
    "job.started": State.RUNNING,
    "job.retrying": State.RETRYING,
    "job.succeeded": State.SUCCEEDED,
    "job.dead": State.DEAD,
    "job.cancelled": State.CANCELLED,
    "job.discarded": State.DISCARDED,
}

_JOB_EVENTS = "SELECT id, job_id, type, data FROM jobs_jobevent WHERE job_id = %s AND id > %s ORDER BY id"
_BATCH_EVENTS = (
    "SELECT e.id, e.job_id, e.type, e.data FROM jobs_jobevent e JOIN jobs_job j ON j.id = e.job_id"
    " WHERE j.batch_id = %s AND e.id > %s ORDER BY e.id"
)


@dataclass
class _Shown:
    """What the terminal shows of one job."""

    state: str
    percent: int
    message: str
    attempt: int = 0
    text: str = ""  # the current attempt's text so far
    next_line: int = 0  # number of the attempt's next log line


@dataclass
class Watch:
    out: TextIO
    tty: bool
    job: Job | None = None
    batch: Batch | None = None
    jobs: dict[UUID, _Shown] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    cursor: int = 0
    status: str = ""  # the status line last drawn
    partial: str = ""  # streamed text of the current line, not yet printed
    quiet: bool = False  # catching up with the job's past events: print nothing
    error: str = ""  # why the job did not succeed
    backlog: list[str] = field(default_factory=list)  # log lines of the current attempt met while quiet

    # --- what it follows ------------------------------------------------------

    def run(self) -> int:
        """Follow until the job (every job of the batch) has finished; the exit code."""
        with psycopg.connect(make_conninfo(**listen_params("conveyor-jobs-watch")), autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            # LISTEN first, then the starting point: whatever commits after
            # is notified or read below.
            self._start(conn)
            rounds = 0
            while not self._finished():
                woke = any(True for _ in conn.notifies(timeout=WAKE_SECONDS, stop_after=1))
                rounds += 1
                self._read(conn, margin=not woke or rounds % 10 == 0)
            if self.job is not None and self.jobs[self.job.id].state != State.SUCCEEDED:
                # Once, at the end: what stopped it (events carry no messages).
                row = conn.execute("SELECT error_type, error_message FROM jobs_job WHERE id = %s", [self.job.id])
                self.error = ": ".join(part for part in row.fetchone() if part)
        self._end()
        return 0 if all(shown.state == State.SUCCEEDED for shown in self.jobs.values()) else 1

    def _start(self, conn: psycopg.Connection) -> None:
        if self.batch is not None:
            rows = conn.execute(
                "SELECT id, state, progress_percent, progress_message, attempts FROM jobs_job WHERE batch_id = %s",
                [self.batch.id],
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT id, state, progress_percent, progress_message, attempts FROM jobs_job WHERE id = %s",
                [self.job.id],
            ).fetchall()
        for job_id, state, percent, message, attempt in rows:
            self.jobs[job_id] = _Shown(state, percent, message, attempt)
        self.cursor = conn.execute("SELECT coalesce(max(id), 0) FROM jobs_jobevent").fetchone()[0]
        if self.job is not None:
            self._header(f"{self.job.kind} {self.job.id}")
        else:
            self._header(f"batch {self.batch.name} {self.batch.id} ({len(self.jobs)} jobs)")
        # The past events, silently: where the states, the text and the log
        # stand, and none of them taken for news by a later re-read.
        self.quiet = True
        self._read(conn, after=0)
        self.quiet = False
        if self.job is not None:
            for line in self.backlog:  # its log so far, then its text so far
                self._line(line)
            self._emit(self.jobs[self.job.id].text)
        self._draw()

    def _read(self, conn: psycopg.Connection, *, margin: bool = False, after: int | None = None) -> None:
        if after is None:
            after = max(0, self.cursor - MARGIN) if margin else self.cursor
        query, key = (_JOB_EVENTS, self.job.id) if self.job is not None else (_BATCH_EVENTS, self.batch.id)
        for event_id, job_id, type, data in conn.execute(query, [key, after]).fetchall():
            if event_id in self.seen:
                continue
            self.seen.add(event_id)
            self.cursor = max(self.cursor, event_id)
            self._apply(self.jobs.setdefault(job_id, _Shown(State.QUEUED, 0, "")), job_id, type, data or {})
        self._draw()

    def _finished(self) -> bool:
        return bool(self.jobs) and all(shown.state in FINISHED_STATES for shown in self.jobs.values())

    # --- events ---------------------------------------------------------------

    def _apply(self, shown: _Shown, job_id: UUID, type: str, data: dict) -> None:
        if type == PROGRESS_EVENT:
            shown.percent, shown.message = data.get("percent", shown.percent), data.get("message", "")
        elif type == OUTPUT_EVENT and self.job is not None:
            self._output(shown, data)
        elif type == LOG_EVENT and self.job is not None:
            self._logs(shown, data)
        elif type in _STATE_OF:
            shown.state = _STATE_OF[type]
            if type == "job.started":
                shown.attempt = data.get("attempts", shown.attempt + 1)
                shown.percent, shown.message, shown.text, shown.next_line = 0, "", "", 0
                self.backlog.clear()  # another attempt's
                if self.job is not None:
                    if self.partial:
                        self._line(self.partial)
                    self.partial = ""
                    self._line(f"attempt {shown.attempt} started")
            elif type == "job.succeeded":
                shown.percent = 100
            elif type == "job.retrying":
                shown.message = f"{data.get('error_type', 'failed')}; retrying in {data.get('delay', 0):.1f} s"
            if self.batch is not None and shown.state in FINISHED_STATES:
                self._line(f"job {job_id} {shown.state}")

    def _output(self, shown: _Shown, data: dict) -> None:
        attempt, offset, text = data.get("attempt", 0), data.get("offset", 0), data.get("text", "")
        if attempt != shown.attempt or offset > len(shown.text) or offset + len(text) <= len(shown.text):
            return  # another attempt's, a gap, or already shown
        self._text(shown, text[len(shown.text) - offset :])

    def _logs(self, shown: _Shown, data: dict) -> None:
        if data.get("attempt") != shown.attempt:
            return
        first, lines = data.get("first", 0), data.get("lines", [])
        for number, line in enumerate(lines, start=first):
            if number >= shown.next_line:
                if self.quiet:
                    self.backlog.append(f"  | {line}")
                else:
                    self._line(f"  | {line}")
        shown.next_line = max(shown.next_line, first + len(lines))

    # --- the terminal -----------------------------------------------------------

    def _header(self, title: str) -> None:
        self._line(f"watching {title}")

    def _text(self, shown: _Shown, fresh: str) -> None:
        shown.text += fresh
        if not self.quiet:
            self._emit(fresh)

    def _emit(self, fresh: str) -> None:
        """Streamed text: whole lines printed above the status line."""
        *lines, self.partial = (self.partial + fresh).split("\n")
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.out.write(line + "\n")
        if self.tty:  # the status line was cleared for it: draw it again
            self.status = ""

    def _clear(self) -> None:
        if self.tty and self.status:
            self.out.write("\r\033[K")

    def _draw(self) -> None:
        status = self._status()
        if self.quiet or status == self.status:
            return
        self._clear()
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write(status[:width])
        else:
            self.out.write(status + "\n")
        self.out.flush()
        self.status = status

    def _status(self) -> str:
        if self.job is not None:
            shown = self.jobs[self.job.id]
            percent, label = shown.percent, f"{shown.state} {shown.message}".rstrip()
            if self.partial and self.tty:
                label += f" | {self.partial}"
        else:
            states = [s.state for s in self.jobs.values()]
            done = sum(s in FINISHED_STATES for s in states)
            percent = 100 * done // max(len(states), 1)
            counts = {state: states.count(state) for state in sorted(set(states))}
            label = f"{done}/{len(states)} finished: " + ", ".join(f"{n} {state}" for state, n in counts.items())
        filled = BAR * max(0, min(100, percent)) // 100
        return f"[{'#' * filled}{'.' * (BAR - filled)}] {percent:>3}% {label}"

    def _end(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = ""
        status = self._status()
        if self.tty or status != self.status:  # a terminal's status line ends; a log's was written already
            self._clear()
            self.out.write(status + "\n")
        if self.error:
            self.out.write(f"error: {self.error}\n")
        if self.job is not None:
            self.out.write(f"{self.job.id} {self.jobs[self.job.id].state}\n")
        self.out.flush()


def watch(target: Job | Batch, out: TextIO = sys.stdout) -> int:
    """Follow a job or a batch until it ends; 0 when everything succeeded, else 1."""
    tty = out.isatty()
    if isinstance(target, Batch):
        return Watch(out, tty, batch=target).run()
    return Watch(out, tty, job=target).run()
