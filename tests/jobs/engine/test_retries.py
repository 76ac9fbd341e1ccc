"""The retry policy: pure functions, no database."""

from __future__ import annotations

import random

import pytest

from jobs.engine import retries
from jobs.errors import PermanentError, RetryableError


def expected_cap(failures: int, *, base: float, maximum: float) -> float:
    return min(maximum, base * 2 ** (failures - 1))


@pytest.mark.parametrize(("base", "maximum"), [(2.0, 600.0), (0.5, 30.0), (1.0, 1.0), (10.0, 7 * 24 * 3600.0)])
def test_the_backoff_delay_of_the_nth_failure_lies_between_half_the_cap_and_the_cap(base, maximum):
    rng = random.Random(20240611)
    for failures in range(1, 101):
        cap = expected_cap(failures, base=base, maximum=maximum)
        for _ in range(20):
            delay = retries.backoff_delay(failures, base=base, maximum=maximum, rng=rng)
            assert cap / 2 <= delay <= cap, (failures, delay, cap)


def test_the_backoff_cap_doubles_until_it_reaches_the_maximum():
    caps = [retries.backoff_cap(n, base=2.0, maximum=600.0) for n in range(1, 12)]
    assert caps == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 600.0, 600.0]


def test_the_backoff_cap_stays_at_the_maximum_for_a_huge_failure_count():
    assert retries.backoff_cap(10_000, base=2.0, maximum=600.0) == 600.0


def test_the_backoff_delay_is_jittered_rather_than_constant():
    rng = random.Random(7)
    delays = {retries.backoff_delay(5, base=2.0, maximum=600.0, rng=rng) for _ in range(50)}
    assert len(delays) > 40
    assert min(delays) < 24.0 < max(delays)  # both halves of [16, 32] are reached


def test_a_seeded_random_gives_the_same_delays():
    first = [retries.backoff_delay(n, base=2.0, maximum=600.0, rng=random.Random(42)) for n in range(1, 10)]
    second = [retries.backoff_delay(n, base=2.0, maximum=600.0, rng=random.Random(42)) for n in range(1, 10)]
    assert first == second


def decide(exc: BaseException, *, attempts: int, max_attempts: int = 5) -> retries.Decision:
    return retries.decide(exc, attempts=attempts, max_attempts=max_attempts, base=2.0, maximum=600.0)


def test_a_transient_error_is_retried_after_a_backoff_delay():
    for attempts in range(1, 5):
        decision = decide(RuntimeError("boom"), attempts=attempts)
        cap = expected_cap(attempts, base=2.0, maximum=600.0)
        assert decision.retry is True
        assert decision.count_attempt is True
        assert cap / 2 <= decision.delay <= cap


def test_retry_after_wins_over_the_backoff():
    decision = decide(RetryableError("slow down", retry_after=123.5), attempts=1)
    assert decision == retries.Decision(retry=True, delay=123.5, count_attempt=True)


def test_retry_after_wins_even_when_it_is_shorter_than_the_backoff():
    decision = decide(RetryableError("slow down", retry_after=0.25), attempts=9, max_attempts=10)
    assert decision.retry is True
    assert decision.delay == 0.25


def test_a_negative_retry_after_means_at_once():
    assert decide(RetryableError("x", retry_after=-5), attempts=1).delay == 0.0


def test_a_permanent_error_is_not_retried():
    assert decide(PermanentError("no"), attempts=1).retry is False


def test_a_permanent_error_is_not_retried_even_with_attempts_left():
    assert decide(PermanentError("no"), attempts=1, max_attempts=50).retry is False


def test_it_stops_retrying_when_the_attempts_are_exhausted():
    assert decide(RuntimeError("boom"), attempts=5, max_attempts=5).retry is False
    assert decide(RetryableError("boom"), attempts=5, max_attempts=5).retry is False
    assert decide(RetryableError("boom", retry_after=1.0), attempts=3, max_attempts=3).retry is False


def test_the_last_attempt_but_one_is_still_retried():
    assert decide(RuntimeError("boom"), attempts=4, max_attempts=5).retry is True


def test_an_uncounted_retryable_error_is_retried_even_at_max_attempts():
    decision = decide(RetryableError("throttled", count_attempt=False), attempts=5, max_attempts=5)
    cap = expected_cap(5, base=2.0, maximum=600.0)
    assert decision.retry is True
    assert decision.count_attempt is False
    assert cap / 2 <= decision.delay <= cap


def test_an_uncounted_retryable_error_uses_its_retry_after():
    decision = decide(RetryableError("429", retry_after=30, count_attempt=False), attempts=5, max_attempts=5)
    assert decision == retries.Decision(retry=True, delay=30, count_attempt=False)
