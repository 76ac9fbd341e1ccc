"""Demo kinds used by the dashboard's first steps, the tests and the benchmarks."""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import Field

from jobs.engine.registry import Payload, handler
from jobs.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)


class NoopPayload(Payload):
    pass


@handler("demo.noop", schema=NoopPayload, timeout=60)
def noop(ctx, payload: NoopPayload) -> dict:
    """Does nothing and succeeds."""
    return {}


class SleepPayload(Payload):
    seconds: float = Field(ge=0, le=3600, description="How long to sleep in total.")
    steps: int = Field(default=10, ge=1, le=1000, description="Progress reports along the way.")


@handler("demo.sleep", schema=SleepPayload, timeout=3700)
def sleep(ctx, payload: SleepPayload) -> dict:
    """Sleeps, reporting progress at each step."""
    step = payload.seconds / payload.steps
    for done in range(1, payload.steps + 1):
        time.sleep(step)
        log.info("step %d of %d done", done, payload.steps)
        ctx.report_progress(100 * done // payload.steps, f"step {done} of {payload.steps}")
    return {"slept": payload.seconds}


class FailPayload(Payload):
    mode: Literal["transient", "permanent"] = "transient"
    succeed_on_attempt: int | None = Field(default=None, ge=1, le=50)
    message: str = Field(default="demo failure", max_length=2000)


class DemoTransientError(RetryableError):
    pass


class DemoPermanentError(PermanentError):
    pass


@handler("demo.fail", schema=FailPayload, timeout=60)
def fail(ctx, payload: FailPayload) -> dict:
    """Fails (transiently or permanently) until attempt `succeed_on_attempt`."""
    if payload.succeed_on_attempt is not None and ctx.attempt >= payload.succeed_on_attempt:
        return {"succeeded_on_attempt": ctx.attempt}
    if payload.mode == "permanent":
        raise DemoPermanentError(payload.message)
    raise DemoTransientError(payload.message)


class AsyncSleepPayload(Payload):
    seconds: float = Field(ge=0, le=3600)
    steps: int = Field(default=10, ge=1, le=1000)
    fail: bool = Field(default=False, description="Raise a transient error at the end (with the output so far).")


@handler("demo.async_sleep", schema=AsyncSleepPayload, queue="default", timeout=3700)
async def async_sleep(ctx, payload: AsyncSleepPayload) -> dict:
    """Waits without blocking its worker: runs in the asyncio lane, many at once."""
    import asyncio

    output = ""
    for done in range(1, payload.steps + 1):
        await asyncio.sleep(payload.seconds / payload.steps)
        output += f"step {done}\n"
        log.info("step %d of %d done", done, payload.steps)
        ctx.report_progress(100 * done // payload.steps, f"step {done} of {payload.steps}", output=output)
    if payload.fail:
        raise DemoTransientError("failed after its last step")
    return {"slept": payload.seconds}


class CollectPayload(Payload):
    pass


@handler("demo.collect", schema=CollectPayload, timeout=60)
def collect(ctx, payload: CollectPayload) -> dict:
    """A workflow's last step: returns the results of the jobs it depended on
    and, as a batch's `then` job, the batch's counts."""
    return {"dependencies": ctx.dependency_results(), "batch": ctx.batch_counts()}


@handler("demo.async_collect", schema=CollectPayload, queue="default", timeout=60)
async def async_collect(ctx, payload: CollectPayload) -> dict:
    """`demo.collect` in the asyncio lane."""
    return {"dependencies": await ctx.dependency_results(), "batch": await ctx.batch_counts()}
