"""The simulated provider alone under Daphne, as the benchmarks run it:
`daphne config.simulator.asgi:application`.

It is `config.simulator.simulated.asgi_app` (no Django middleware, no database) with
the TCP write path `config/asgi.py` installs for the whole app
(`config/server/tcp_writes.py`), so a standalone simulator streams as cheaply as the
one `make run` serves: unpatched, it became a bottleneck of its own under the
LLM benchmark.

Django is not set up here, so its controls (the `X-Sim-*` failure-injection
headers, `/simulated/v1/load`) are off unless `CONVEYOR_SIMULATOR_CONTROLS=1`;
options in the model name (`simulated@latency_ms=1000`) always work.
"""

from __future__ import annotations

from config.server import tcp_writes
from config.simulator.simulated import asgi_app as application

tcp_writes.install()

__all__ = ["application"]
