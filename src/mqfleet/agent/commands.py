"""Command handling on the agent: exactly-once acceptance, execution, result outbox.

INTERFACE STUB: the agent core (``agent/service.py``) codes against this contract; the
implementation replaces the bodies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mqfleet.settings import Settings

__all__ = ["CommandService", "Publish"]

#: Publishes ``payload`` on ``topic`` with QoS 1, not retained, and returns once the
#: broker has acknowledged it (PUBACK). Raises when the connection is lost.
Publish = Callable[[str, bytes], Awaitable[None]]


class CommandService:
    """Accepts commands for this node, runs each at most once and reports the results."""

    def __init__(self, settings: Settings) -> None:
        """Use ``settings.agent_state_dir`` for the journal and the result outbox."""
        self._settings = settings

    async def start(self) -> None:
        """Open the journal; report commands cut short by a previous crash. Call once."""

    def accept(self, payload: bytes) -> None:
        """Take a payload from this node's commands topic; never raises on bad input."""

    async def run_loop(self) -> None:
        """Execute accepted commands (at most N at once); runs for the agent's lifetime."""

    async def deliver_loop(self, publish: Publish) -> None:
        """Send pending results in order while connected; returns or raises on disconnect."""
