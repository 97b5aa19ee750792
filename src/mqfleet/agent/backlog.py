"""The bounded, in-order buffer of metrics samples not yet acknowledged by the broker.

Every sample goes through it, connected or not: the publisher removes a sample only
after the broker's PUBACK, so a broker outage of up to ``maxlen`` samples (24 h at the
default interval) loses nothing. Beyond that the oldest samples are dropped, counted and
logged: recent data is worth more than old data to an operator.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mqfleet.protocol import MetricsReport

__all__ = ["MetricsBacklog"]

log = logging.getLogger(__name__)

#: After the first drop of a run of drops, log one warning per this many more.
_DROP_LOG_EVERY: Final = 100


class MetricsBacklog:
    """FIFO of samples awaiting a PUBACK; drops (and counts) the oldest when full."""

    def __init__(self, maxlen: int) -> None:
        """Hold at most ``maxlen`` samples."""
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        self._items: deque[MetricsReport] = deque()
        self._not_empty = asyncio.Event()
        #: Samples dropped because the backlog was full, since start-up.
        self.dropped = 0
        self._drops_in_run = 0

    def __len__(self) -> int:
        """Return the number of samples waiting."""
        return len(self._items)

    def append(self, report: MetricsReport) -> None:
        """Queue ``report``; drop the oldest sample first if the backlog is full."""
        if len(self._items) >= self.maxlen:
            oldest = self._items.popleft()
            self.dropped += 1
            self._drops_in_run += 1
            if self._drops_in_run == 1 or self._drops_in_run % _DROP_LOG_EVERY == 0:
                log.warning(
                    "metrics backlog full (%d samples): dropped the oldest "
                    "(session %d seq %d); %d dropped since start-up",
                    self.maxlen,
                    oldest.session,
                    oldest.seq,
                    self.dropped,
                )
        self._items.append(report)
        self._not_empty.set()

    def oldest(self, limit: int) -> list[MetricsReport]:
        """Up to ``limit`` samples from the head, oldest first (they stay queued)."""
        return [self._items[i] for i in range(min(limit, len(self._items)))]

    async def wait_not_empty(self) -> None:
        """Return as soon as at least one sample is queued."""
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()

    def remove_acknowledged(self, reports: Sequence[MetricsReport]) -> int:
        """Remove ``reports`` (a head prefix taken earlier) now that they are acknowledged.

        Samples that were dropped meanwhile (the backlog filled up while they were in
        flight) are no longer at the head and are skipped; returns how many were removed.
        """
        removed = 0
        for report in reports:
            if self._items and self._items[0] is report:
                self._items.popleft()
                removed += 1
        if removed and len(self._items) < self.maxlen:
            # A run of drops ends once the publisher catches up.
            self._drops_in_run = 0
        return removed
