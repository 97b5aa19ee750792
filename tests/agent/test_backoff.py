from __future__ import annotations

import random

from mqfleet.transport import Backoff


def test_delays_grow_exponentially_up_to_the_cap_with_jitter():
    backoff = Backoff(initial_s=0.5, maximum_s=8.0, _rng=random.Random(7))  # noqa: S311 - seeded jitter, not crypto
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(10)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        # Full jitter in the upper half: never an immediate retry, never above the cap.
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 8.0
    assert backoff.attempt == 10


def test_jitter_spreads_agents_apart():
    a = Backoff(_rng=random.Random(1))  # noqa: S311 - seeded jitter
    b = Backoff(_rng=random.Random(2))  # noqa: S311 - seeded jitter
    assert [a.next_delay() for _ in range(5)] != [b.next_delay() for _ in range(5)]


def test_reset_starts_again_from_the_initial_delay():
    backoff = Backoff(initial_s=1.0, maximum_s=30.0)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert 0.5 <= backoff.next_delay() <= 1.0
