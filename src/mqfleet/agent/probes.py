"""Metric probes: cpu, memory, disk and load, read from an injectable psutil-like source.

As in Telegraf's inputs, the data source is a seam: production passes the ``psutil``
module itself, tests pass an object that replays recorded values.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import psutil

from mqfleet.protocol import MetricsReport

if TYPE_CHECKING:
    from datetime import datetime

__all__ = [
    "MetricsProbe",
    "MetricsSource",
    "ProbeStalledError",
    "ProbeValueError",
    "Sample",
    "default_source",
]


class _HasPercent(Protocol):
    @property
    def percent(self) -> float: ...


class MetricsSource(Protocol):
    """The part of psutil's API the probes use (the ``psutil`` module satisfies it)."""

    def cpu_percent(self, interval: float | None = None) -> float:
        """System-wide cpu usage in percent since the previous call (``interval=None``)."""
        ...

    def virtual_memory(self) -> _HasPercent:
        """Memory usage; only ``percent`` is read."""
        ...

    def disk_usage(self, path: str) -> _HasPercent:
        """Usage of the filesystem holding ``path``; only ``percent`` is read."""
        ...

    def getloadavg(self) -> tuple[float, float, float]:
        """Return the 1, 5 and 15 minute load averages."""
        ...


def default_source() -> MetricsSource:
    """Return the real source: the ``psutil`` module."""
    return psutil


class ProbeValueError(ValueError):
    """A probe returned a value that is not a finite number (a broken source).

    Like :class:`ProbeStalledError`, it never leaves the agent: the metrics loop counts
    it as a failed sample and reports a node status ``error`` when failures persist.
    """


class ProbeStalledError(TimeoutError):
    """A read of the probes is still running past its deadline (e.g. a hung NFS mount)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of every probe."""

    cpu_usage: float
    memory_usage: float
    disk_usage: float
    load_average: float

    def to_report(self, *, node_id: str, session: int, seq: int, ts: datetime) -> MetricsReport:
        """Build the wire payload of this sample."""
        return MetricsReport(
            node_id=node_id,
            session=session,
            seq=seq,
            ts=ts,
            cpu_usage=self.cpu_usage,
            memory_usage=self.memory_usage,
            disk_usage=self.disk_usage,
            load_average=self.load_average,
        )


def _finite(name: str, value: float) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ProbeValueError(f"{name} is not a finite number: {value!r}")
    return number


def _percent(name: str, value: float) -> float:
    # psutil can overshoot 100.0 by rounding (and reports 0..100 otherwise): clamp, so a
    # rounding artefact never makes a sample invalid on the wire.
    return min(100.0, max(0.0, _finite(name, value)))


class MetricsProbe:
    """Reads cpu, memory, disk and load from ``source``; cpu is usage since the last read."""

    def __init__(self, source: MetricsSource, *, disk_path: str = "/") -> None:
        """Read from ``source``; report the usage of the filesystem holding ``disk_path``."""
        self._source = source
        self._disk_path = disk_path
        self._primed = False
        self._inflight: asyncio.Future[Sample] | None = None

    def prime(self) -> None:
        """Start the cpu measurement, so the first sample is not psutil's meaningless 0.0."""
        # cpu_percent(interval=None) compares with the previous call; the very first call
        # has nothing to compare with and returns 0.0, which we throw away here.
        self._source.cpu_percent(interval=None)
        self._primed = True

    def sample(self) -> Sample:
        """Read every probe once (blocking: call it from a worker thread)."""
        if not self._primed:
            self.prime()
        cpu = self._source.cpu_percent(interval=None)
        memory = self._source.virtual_memory().percent
        disk = self._source.disk_usage(self._disk_path).percent
        load = self._source.getloadavg()[0]
        return Sample(
            cpu_usage=_percent("cpu_usage", cpu),
            memory_usage=_percent("memory_usage", memory),
            disk_usage=_percent("disk_usage", disk),
            load_average=max(0.0, _finite("load_average", load)),
        )

    async def sample_async(self, timeout_s: float | None = None) -> Sample:
        """Read every probe in a worker thread, never blocking the event loop.

        A read that exceeds ``timeout_s`` raises :class:`ProbeStalledError`; its thread
        cannot be interrupted, so no new read starts until it has finished (a hung
        filesystem must not eat one worker thread per interval).
        """
        if self._inflight is not None and self._inflight.done():
            # A read that outlived its deadline has finished meanwhile: its values are
            # stale, so drop them (retrieving the outcome keeps asyncio quiet).
            if not self._inflight.cancelled():
                self._inflight.exception()
            self._inflight = None
        if self._inflight is not None:
            raise ProbeStalledError("the previous read of the probes is still running")
        inflight = asyncio.ensure_future(asyncio.to_thread(self.sample))
        self._inflight = inflight
        try:
            async with asyncio.timeout(timeout_s):
                # shield: on a deadline the thread keeps running; we only stop waiting.
                return await asyncio.shield(inflight)
        except TimeoutError as exc:
            if inflight.done():  # the read itself failed with a timeout of its own
                raise
            raise ProbeStalledError(f"reading the probes took longer than {timeout_s:g} s") from exc
        finally:
            if inflight.done():
                self._inflight = None
