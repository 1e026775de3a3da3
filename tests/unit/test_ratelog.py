"""LogLimiter: one line per key per interval, each saying how many were held back before it."""

from __future__ import annotations

from bootd.ratelog import LogLimiter


def test_one_line_per_key_per_interval_with_the_count_held_back() -> None:
    now = [100.0]
    limiter = LogLimiter(every=1.0, clock=lambda: now[0])
    assert limiter.allow("busy") == 0  # the first line always goes out
    assert limiter.allow("busy") is None and limiter.allow("busy") is None
    assert limiter.allow("other") == 0  # keys are independent
    now[0] += 0.5
    assert limiter.allow("busy") is None
    now[0] += 0.5
    assert limiter.allow("busy") == 3  # three held back since the last line
    assert limiter.allow("busy") is None
