"""`make bench` (with bench/api_submit.py and bench/sse_bench.py): every benchmark,
Conveyor against the stock alternative in the same run, medians of 3.
Usage: python -m bench [w1 w2 w3 compete w4 fanin counters horizon history content peers ...]
       [--jobs N (horizon's size)] [--history-jobs N (history's size, default 2,000,000)] [--rows N (content's size)]"""

from __future__ import annotations

import platform
import sys
import time

from bench.harness import Table, setup_django


def main(argv: list[str]) -> int:
    from functools import partial

    from bench import horizon

    jobs, argv = _jobs_option(argv)
    history_jobs, argv = _history_jobs_option(argv)
    rows, argv = _rows_option(argv)
    setup_django()
    from bench import content_bench, counters_bench, fanin, history, llm_bench, peers, queue_bench

    benchmarks = {
        "w1": queue_bench.w1_submission,
        "w2": queue_bench.w2_drain,
        "w3": queue_bench.w3_pickup,
        "compete": queue_bench.competing_clusters,
        "w4": llm_bench.w4_llm,
        "fanin": fanin.fanin,
        "counters": counters_bench.counters,
        "horizon": partial(horizon.horizon, n=jobs) if jobs else horizon.horizon,
        "history": partial(history.history, n=history_jobs) if history_jobs else history.history,
        "content": partial(content_bench.content, rows=rows) if rows else content_bench.content,
        "peers": peers.peers,
    }
    chosen = argv or list(benchmarks)
    unknown = [name for name in chosen if name not in benchmarks]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(benchmarks)}", file=sys.stderr)
        return 2
    import django
    import django_q
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
    print(
        f"Python {platform.python_version()}, Django {django.get_version()}, django-q2 {django_q.VERSION}, "
        f"Postgres {pg}, {platform.machine()}, {__import__('os').cpu_count()} CPUs",
        flush=True,
    )
    table = Table()
    started = time.monotonic()
    for name in chosen:
        print(f"== {name}", flush=True)
        benchmarks[name](table)
    print()
    print(table.render())
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


def _jobs_option(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--jobs N` (the horizon benchmark's size) taken out of the names."""
    if "--jobs" not in argv:
        return None, argv
    at = argv.index("--jobs")
    from bench.horizon import parse

    return parse(argv[at : at + 2]), argv[:at] + argv[at + 2 :]


def _history_jobs_option(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--history-jobs N` (the history benchmark's size) taken out of the names."""
    if "--history-jobs" not in argv:
        return None, argv
    at = argv.index("--history-jobs")
    from bench.history import parse

    return parse(argv[at : at + 2]), argv[:at] + argv[at + 2 :]


def _rows_option(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--rows N` (the content benchmark's size) taken out of the names."""
    if "--rows" not in argv:
        return None, argv
    at = argv.index("--rows")
    value = argv[at + 1] if at + 1 < len(argv) else ""
    if not value.isdigit() or not 1 <= int(value) <= 10_000:
        sys.exit(f"--rows wants a number of rows from 1 to 10000, not {value!r}")
    return int(value), argv[:at] + argv[at + 2 :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
