from __future__ import annotations

import asyncio
import math
import threading
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec
import pytest

from mqfleet.agent.probes import (
    MetricsProbe,
    ProbeStalledError,
    ProbeValueError,
    default_source,
)


class Percent(NamedTuple):
    percent: float


class RecordedSource:
    """Replays recorded psutil readings, one per call."""

    def __init__(self, cpu, memory=(50.0,), disk=(70.0,), load=((0.5, 0.4, 0.3),)):
        self.cpu = list(cpu)
        self.memory = list(memory)
        self.disk = list(disk)
        self.load = list(load)
        self.cpu_intervals: list[float | None] = []
        self.disk_paths: list[str] = []
        self.threads: list[int] = []

    @staticmethod
    def _next(values):
        return values.pop(0) if len(values) > 1 else values[0]

    def cpu_percent(self, interval=None):
        self.cpu_intervals.append(interval)
        self.threads.append(threading.get_ident())
        return self._next(self.cpu)

    def virtual_memory(self):
        return Percent(self._next(self.memory))

    def disk_usage(self, path):
        self.disk_paths.append(path)
        return Percent(self._next(self.disk))

    def getloadavg(self):
        return self._next(self.load)


def test_cpu_is_usage_since_previous_sample_never_the_priming_zero():
    # psutil's first cpu_percent(interval=None) has nothing to compare with: 0.0.
    source = RecordedSource(cpu=[0.0, 12.5, 80.0])
    probe = MetricsProbe(source, disk_path="/data")
    probe.prime()
    first = probe.sample()
    second = probe.sample()
    assert first.cpu_usage == 12.5
    assert second.cpu_usage == 80.0
    # Never blocking psutil's own sleep: always "since the previous call".
    assert source.cpu_intervals == [None, None, None]


def test_unprimed_probe_primes_itself_once():
    source = RecordedSource(cpu=[0.0, 33.0, 44.0])
    probe = MetricsProbe(source)
    assert probe.sample().cpu_usage == 33.0
    assert probe.sample().cpu_usage == 44.0
    assert len(source.cpu_intervals) == 3


def test_recorded_values_become_a_report():
    source = RecordedSource(cpu=[0.0, 7.25], memory=[61.5], disk=[42.0], load=[(1.75, 1.0, 0.5)])
    probe = MetricsProbe(source, disk_path="/var")
    probe.prime()
    sample = probe.sample()
    assert (sample.cpu_usage, sample.memory_usage, sample.disk_usage, sample.load_average) == (
        7.25,
        61.5,
        42.0,
        1.75,  # the 1-minute load average
    )
    assert source.disk_paths == ["/var"]
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    report = sample.to_report(node_id="web-1", session=3, seq=9, ts=ts)
    assert msgspec.structs.asdict(report) == {
        "v": 1,
        "node_id": "web-1",
        "session": 3,
        "seq": 9,
        "ts": ts,
        "cpu_usage": 7.25,
        "memory_usage": 61.5,
        "disk_usage": 42.0,
        "load_average": 1.75,
    }


def test_rounding_overshoot_is_clamped_to_valid_percentages():
    source = RecordedSource(cpu=[0.0, 100.00001], memory=[-0.0], disk=[100.2])
    sample = MetricsProbe(source).sample()
    assert sample.cpu_usage == 100.0
    assert sample.disk_usage == 100.0
    assert sample.memory_usage == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_are_refused(bad):
    source = RecordedSource(cpu=[0.0, 5.0], memory=[bad])
    with pytest.raises(ProbeValueError, match="memory_usage"):
        MetricsProbe(source).sample()


def test_the_real_psutil_source_gives_valid_values():
    probe = MetricsProbe(default_source())
    probe.prime()
    sample = probe.sample()
    for value in (sample.cpu_usage, sample.memory_usage, sample.disk_usage):
        assert 0.0 <= value <= 100.0
    assert sample.load_average >= 0.0


async def test_sampling_runs_off_the_event_loop():
    source = RecordedSource(cpu=[0.0, 1.0])
    probe = MetricsProbe(source)
    probe.prime()
    await probe.sample_async(5.0)
    assert source.threads[-1] != threading.get_ident()


class HangingSource(RecordedSource):
    def __init__(self):
        super().__init__(cpu=[0.0, 1.0, 2.0])
        self.release = threading.Event()
        self.calls = 0

    def disk_usage(self, path):
        self.calls += 1
        self.release.wait(20)  # a hung NFS mount
        return super().disk_usage(path)


async def test_a_stalled_read_times_out_and_never_starts_a_second_thread():
    source = HangingSource()
    probe = MetricsProbe(source)
    probe.prime()
    with pytest.raises(ProbeStalledError, match="longer than"):
        await probe.sample_async(0.05)
    with pytest.raises(ProbeStalledError, match="still running"):
        await probe.sample_async(0.05)
    assert source.calls == 1
    source.release.set()
    # Once the hung read finishes, its stale values are dropped and a fresh read runs.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            sample = await probe.sample_async(5.0)
            break
        except ProbeStalledError:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    assert source.calls == 2
    assert sample.cpu_usage == 2.0
