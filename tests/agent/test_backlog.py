from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from mqfleet.agent.backlog import MetricsBacklog
from mqfleet.protocol import MetricsReport
from mqfleet.settings import DEFAULT_METRICS_INTERVAL_S, Settings


def report(seq: int) -> MetricsReport:
    return MetricsReport(
        node_id="n1",
        session=1,
        seq=seq,
        ts=datetime(2026, 1, 1, tzinfo=UTC),
        cpu_usage=1.0,
        memory_usage=2.0,
        disk_usage=3.0,
        load_average=0.1,
    )


def seqs(backlog: MetricsBacklog) -> list[int]:
    return [r.seq for r in backlog.oldest(len(backlog))]


def test_keeps_samples_in_order():
    backlog = MetricsBacklog(10)
    for i in range(5):
        backlog.append(report(i))
    assert seqs(backlog) == [0, 1, 2, 3, 4]
    assert [r.seq for r in backlog.oldest(2)] == [0, 1]
    assert len(backlog) == 5  # peeking removes nothing


def test_drops_the_oldest_when_full_and_counts(caplog):
    backlog = MetricsBacklog(3)
    with caplog.at_level(logging.WARNING, logger="mqfleet.agent.backlog"):
        for i in range(7):
            backlog.append(report(i))
    assert seqs(backlog) == [4, 5, 6]
    assert backlog.dropped == 4
    assert "dropped the oldest (session 1 seq 0)" in caplog.text


def test_default_bound_covers_a_day_at_the_default_interval():
    assert Settings().metrics_backlog * DEFAULT_METRICS_INTERVAL_S >= 24 * 3600


def test_remove_acknowledged_removes_the_head():
    backlog = MetricsBacklog(10)
    items = [report(i) for i in range(4)]
    for item in items:
        backlog.append(item)
    assert backlog.remove_acknowledged(backlog.oldest(2)) == 2
    assert seqs(backlog) == [2, 3]


def test_samples_dropped_while_in_flight_are_not_removed_twice():
    backlog = MetricsBacklog(3)
    for i in range(3):
        backlog.append(report(i))
    in_flight = backlog.oldest(2)  # seq 0 and 1 are being published
    backlog.append(report(3))  # full: seq 0 dropped meanwhile
    assert backlog.remove_acknowledged(in_flight) == 1
    assert seqs(backlog) == [2, 3]


def test_rejects_a_zero_bound():
    with pytest.raises(ValueError, match="at least 1"):
        MetricsBacklog(0)


async def test_wait_not_empty_wakes_on_append():
    backlog = MetricsBacklog(3)
    waiter = asyncio.create_task(backlog.wait_not_empty())
    await asyncio.sleep(0)
    assert not waiter.done()
    backlog.append(report(0))
    async with asyncio.timeout(10):
        await waiter
