"""Plausible metric values for simulated nodes: mean-reverting walks, seeded and cheap.

Each node gets its own personality (a baseline cpu, memory footprint, disk fill rate and
core count) drawn once from the fleet's random generator, then moves around it like a
real server: cpu is an Ornstein-Uhlenbeck walk with rare bursts, memory drifts slowly,
disk fills slowly and is cleaned up now and then, and the 1-minute load average follows
cpu times the core count with the kernel's exponential smoothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import random

__all__ = ["MetricsModel", "SimulatedSample"]

#: Pull of cpu and memory back to their baseline per sample (0 = none, 1 = all at once).
_REVERSION: Final = 0.2
#: Chance per sample that a cpu burst (a cron job, a deploy) starts.
_BURST_CHANCE: Final = 0.01
#: Disk usage at which a simulated log rotation frees space.
_DISK_CLEANUP_AT: Final = 95.0
_CORES: Final = (1, 2, 4, 8, 16)


def _clamp(value: float, low: float = 0.0, high: float = 100.0) -> float:
    return min(high, max(low, value))


@dataclass(frozen=True, slots=True)
class SimulatedSample:
    """One reading of a simulated node (percentages 0-100, load >= 0)."""

    cpu_usage: float
    memory_usage: float
    disk_usage: float
    load_average: float


class MetricsModel:
    """The metric values of one simulated node, advanced one sample at a time."""

    __slots__ = (
        "_bursting",
        "_cpu",
        "_cpu_base",
        "_decay",
        "_disk",
        "_disk_rate",
        "_load",
        "_memory",
        "_memory_base",
        "_rng",
        "cores",
    )

    def __init__(self, rng: random.Random, *, interval_s: float = 10.0) -> None:
        """Draw this node's personality from ``rng``; samples come every ``interval_s``."""
        self._rng = rng
        self.cores = rng.choice(_CORES)
        self._cpu_base = rng.uniform(3.0, 45.0)
        self._memory_base = rng.uniform(20.0, 80.0)
        self._cpu = self._cpu_base
        self._memory = self._memory_base
        self._disk = rng.uniform(10.0, 85.0)
        # Percent per sample: a few percent a day at a 10 s interval.
        self._disk_rate = rng.uniform(0.0, 3.0) * interval_s / 86400.0
        self._load = self._cpu / 100.0 * self.cores
        self._bursting = 0
        # The kernel's 1-minute load average is an exponential moving average.
        self._decay = math.exp(-interval_s / 60.0)

    def next_sample(self) -> SimulatedSample:
        """Advance by one interval and return the new reading."""
        rng = self._rng
        if self._bursting:
            self._bursting -= 1
            target = 90.0
        else:
            target = self._cpu_base
            if rng.random() < _BURST_CHANCE:
                self._bursting = rng.randint(1, 6)
        self._cpu = _clamp(self._cpu + _REVERSION * (target - self._cpu) + rng.gauss(0.0, 3.0))
        self._memory = _clamp(
            self._memory + _REVERSION / 10 * (self._memory_base - self._memory) + rng.gauss(0, 0.5)
        )
        self._disk += self._disk_rate
        if self._disk >= _DISK_CLEANUP_AT:
            self._disk -= rng.uniform(20.0, 40.0)
        self._disk = _clamp(self._disk)
        runnable = self._cpu / 100.0 * self.cores
        self._load = self._load * self._decay + runnable * (1.0 - self._decay)
        return SimulatedSample(
            cpu_usage=round(self._cpu, 2),
            memory_usage=round(self._memory, 2),
            disk_usage=round(self._disk, 2),
            load_average=round(max(0.0, self._load), 2),
        )
