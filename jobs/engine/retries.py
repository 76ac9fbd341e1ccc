"""Retry policy: exception + job -> decision. Pure: no database, no clock."""

from __future__ import annotations

import random
from dataclasses import dataclass

from jobs.errors import PermanentError, RetryableError


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay: float = 0.0
    count_attempt: bool = True


def backoff_cap(failures: int, *, base: float, maximum: float) -> float:
    """`min(maximum, base × 2^(failures-1))`: the longest delay after the n-th failure."""
    exponent = min(failures - 1, 60)  # 2**60 seconds is long past any maximum
    return min(maximum, base * (2**exponent))


def backoff_delay(failures: int, *, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """A delay between half and all of the cap ("equal jitter"), so that jobs
    which failed together do not retry together."""
    cap = backoff_cap(failures, base=base, maximum=maximum)
    return (rng or random).uniform(cap / 2, cap)


def decide(exc: BaseException, *, attempts: int, max_attempts: int, base: float, maximum: float) -> Decision:
    """What to do after attempt number `attempts` raised `exc`."""
    if isinstance(exc, PermanentError):
        return Decision(retry=False)
    if isinstance(exc, RetryableError) and not exc.count_attempt:
        delay = exc.retry_after if exc.retry_after is not None else backoff_delay(attempts, base=base, maximum=maximum)
        return Decision(retry=True, delay=max(0.0, delay), count_attempt=False)
    if attempts >= max_attempts:
        return Decision(retry=False)
    if isinstance(exc, RetryableError) and exc.retry_after is not None:
        return Decision(retry=True, delay=max(0.0, exc.retry_after))
    return Decision(retry=True, delay=backoff_delay(attempts, base=base, maximum=maximum))
