"""The overview's charts, drawn on the server as SVG from `queue.stats` samples,
and the backlog warning read from the same samples."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

WINDOW = timedelta(minutes=15)
WIDTH, HEIGHT = 560, 120
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 34, 6, 6, 16
# See backlog_warnings.
BACKLOG_SPAN = timedelta(seconds=60)
BACKLOG_MIN_AGE = 60.0
BACKLOG_GROWTH = 0.25

Sample = tuple[datetime, dict]


@dataclass(frozen=True)
class Series:
    name: str
    css: str
    points: str  # an SVG polyline "x,y x,y …"
    last: float


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    series: list[Series]
    y_max: float
    y_ticks: list[tuple[float, str]]  # (y pixel, label)
    x_ticks: list[tuple[float, str, str]]  # (x pixel, label, text-anchor)
    width: int = WIDTH
    height: int = HEIGHT
    empty: bool = False

    @property
    def plot_left(self) -> int:
        return PAD_LEFT

    @property
    def plot_right(self) -> int:
        return WIDTH - PAD_RIGHT

    @property
    def plot_bottom(self) -> int:
        return HEIGHT - PAD_BOTTOM


def _total(data: dict, *fields: str) -> float:
    return float(sum(q.get(f) or 0 for q in data.get("queues", []) for f in fields))


DEPTH = [
    ("to run", "s-waiting", lambda d: _total(d, "queued", "scheduled", "retrying")),
    ("running", "s-running", lambda d: _total(d, "running")),
]
THROUGHPUT = [
    ("succeeded/min", "s-succeeded", lambda d: _total(d, "succeeded_last_minute")),
    ("failed/min", "s-failed", lambda d: _total(d, "failed_last_minute")),
]


def overview_charts(samples: Iterable[Sample], *, now: datetime | None = None) -> list[Chart]:
    samples = list(samples)
    now = now or timezone.now()
    return [
        build_chart("Queue depth", "jobs", samples, DEPTH, now=now),
        build_chart("Throughput", "jobs/min", samples, THROUGHPUT, now=now),
    ]


def build_chart(
    title: str,
    unit: str,
    samples: list[Sample],
    series: list[tuple[str, str, Callable[[dict], float]]],
    *,
    now: datetime,
) -> Chart:
    start = now - WINDOW
    inside = [(at, data) for at, data in samples if at >= start]
    # The value at the window's left edge is the last sample before it.
    before = [(at, data) for at, data in samples if at < start]
    if before:
        inside.insert(0, (start, before[-1][1]))
    values = {name: [(at, value(data)) for at, data in inside] for name, _, value in series}
    y_max = _nice_ceiling(max([v for points in values.values() for _, v in points] + [1.0]))

    def x(at: datetime) -> float:
        return PAD_LEFT + (WIDTH - PAD_LEFT - PAD_RIGHT) * (at - start).total_seconds() / WINDOW.total_seconds()

    def y(value: float) -> float:
        return PAD_TOP + (HEIGHT - PAD_TOP - PAD_BOTTOM) * (1 - value / y_max)

    drawn = []
    for name, css, _ in series:
        points = values[name]
        coords: list[str] = []
        for i, (at, value) in enumerate(points):
            # Statistics are published when they change: hold each value
            # until the next sample (a step line), and the last one until now.
            if i:
                coords.append(f"{x(at):.1f},{y(points[i - 1][1]):.1f}")
            coords.append(f"{x(at):.1f},{y(value):.1f}")
        if points:
            coords.append(f"{x(now):.1f},{y(points[-1][1]):.1f}")
        drawn.append(Series(name, css, " ".join(coords), points[-1][1] if points else 0.0))

    y_ticks = [(round(y(v), 1), _label(v)) for v in (0, y_max / 2, y_max)]
    anchors = {15: "start", 0: "end"}
    x_ticks = [
        (round(x(now - timedelta(minutes=m)), 1), f"−{m} min" if m else "now", anchors.get(m, "middle"))
        for m in (15, 10, 5, 0)
    ]
    return Chart(title, unit, drawn, y_max, y_ticks, x_ticks, empty=not inside)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 × 10^n at or above `value`."""
    magnitude = 1.0
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _label(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def backlog_warnings(samples: Iterable[Sample]) -> dict[str, float]:
    """Queues whose oldest runnable job keeps getting older: queue -> its age in seconds.

    "Keeps getting older": over the last BACKLOG_SPAN (at least), the age never
    went down and grew by at least BACKLOG_GROWTH of the time that passed. A
    queue whose workers keep up has a steady (or zero) oldest age.
    """
    samples = list(samples)
    if not samples:
        return {}
    latest_at = samples[-1][0]
    span_start = [at for at, _ in samples if latest_at - at >= BACKLOG_SPAN]
    if not span_start:
        return {}
    recent = [(at, data) for at, data in samples if at >= span_start[-1]]
    ages: dict[str, list[float | None]] = {}
    for _, data in recent:
        seen = {q["queue"]: q.get("oldest_queued_age_seconds") for q in data.get("queues", [])}
        for queue in {*ages, *seen}:
            ages.setdefault(queue, []).append(seen.get(queue))
    elapsed = (latest_at - recent[0][0]).total_seconds()
    warnings = {}
    for queue, series in ages.items():
        if len(series) != len(recent) or any(age is None for age in series):
            continue  # the queue was empty at some point: not a growing backlog
        if series[-1] < BACKLOG_MIN_AGE:
            continue
        rising = all(later >= earlier for earlier, later in zip(series, series[1:], strict=False))
        if rising and series[-1] - series[0] >= BACKLOG_GROWTH * elapsed:
            warnings[queue] = series[-1]
    return warnings


# --- longer ranges, from the per-minute rollup (jobs/engine/rollup.py) ----------

# What one point of each range covers, for the unit ("jobs per 15 min").
STEP_LABELS = {"1h": "min", "24h": "15 min", "7d": "hour"}
# The x ticks of each range: (offset from the end, label).
RANGE_TICKS = {
    "1h": [(timedelta(minutes=m), f"−{m} min" if m else "now") for m in (60, 45, 30, 15, 0)],
    "24h": [(timedelta(hours=h), f"−{h} h" if h else "now") for h in (24, 18, 12, 6, 0)],
    "7d": [(timedelta(days=d), f"−{d} d" if d else "now") for d in (7, 6, 5, 4, 3, 2, 1, 0)],
}


def rollup_charts(points: list, range_name: str, step: timedelta) -> list[Chart]:
    """Throughput and p95 run time over a range, one point per step of the
    rollup (jobs.services.series), each held for its step. Each Series'
    `points` is an SVG path (`d`), not a polyline's points."""
    per = STEP_LABELS[range_name]
    return [
        _step_chart(
            "Throughput",
            f"jobs/{per}",
            points,
            [("succeeded", "s-succeeded", lambda p: p.succeeded), ("failed", "s-failed", lambda p: p.failed)],
            range_name,
            step,
        ),
        _step_chart(
            "Run time p95", "seconds", points, [("p95", "s-running", _p95_seconds)], range_name, step, hold_gaps=False
        ),
    ]


def _p95_seconds(point) -> float | None:
    return None if point.run_p95_ms is None else point.run_p95_ms / 1000


def _step_chart(
    title: str,
    unit: str,
    points: list,
    series: list[tuple[str, str, Callable]],
    range_name: str,
    step: timedelta,
    *,
    hold_gaps: bool = True,
) -> Chart:
    if not points:
        return Chart(title, unit, [Series(n, c, "", 0.0) for n, c, _ in series], 1.0, [], [], empty=True)
    start, end = points[0].at, points[-1].at + step
    span = (end - start).total_seconds()
    values = {name: [value(p) for p in points] for name, _, value in series}
    y_max = _nice_ceiling(max([v for vs in values.values() for v in vs if v is not None] + [1.0]))

    def x(at: datetime) -> float:
        return PAD_LEFT + (WIDTH - PAD_LEFT - PAD_RIGHT) * (at - start).total_seconds() / span

    def y(value: float) -> float:
        return PAD_TOP + (HEIGHT - PAD_TOP - PAD_BOTTOM) * (1 - value / y_max)

    drawn = []
    for name, css, _ in series:
        # An SVG path: "M" starts a stretch, "L" continues it; a step without
        # attempts (no run time) leaves a gap rather than a line across it.
        coords = []
        joined = False
        for point, value in zip(points, values[name], strict=True):
            if value is None:
                if not hold_gaps:
                    joined = False
                    continue
                value = 0.0
            coords.append(
                f"{'L' if joined else 'M'}{x(point.at):.1f},{y(value):.1f} L{x(point.at + step):.1f},{y(value):.1f}"
            )
            joined = True
        total = sum(v for v in values[name] if v is not None)
        peak = max((v for v in values[name] if v is not None), default=0.0)
        drawn.append(Series(name, css, " ".join(coords), total if hold_gaps else peak))
    y_ticks = [(round(y(v), 1), _label(v)) for v in (0, y_max / 2, y_max)]
    ticks = RANGE_TICKS[range_name]
    x_ticks = [
        (round(x(end - offset), 1), label, "start" if i == 0 else "end" if i == len(ticks) - 1 else "middle")
        for i, (offset, label) in enumerate(ticks)
    ]
    empty = not any(v for vs in values.values() for v in vs)
    return Chart(title, unit, drawn, y_max, y_ticks, x_ticks, empty=empty)
