"""Topic names of wire protocol v1: builders and the one parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, cast

from mqfleet.errors import ProtocolError

__all__ = [
    "DEFAULT_PREFIX",
    "NODE_ID_PATTERN",
    "ParsedTopic",
    "TopicKind",
    "Topics",
    "validate_node_id",
]

DEFAULT_PREFIX: Final = "fleet/v1"

#: A node id is 1-64 characters of ``[A-Za-z0-9_.-]``: never ``/``, ``+`` or ``#``,
#: which would change the topic tree (MQTT 5 spec 4.7.1).
NODE_ID_PATTERN: Final = r"[A-Za-z0-9_.-]{1,64}"
_NODE_ID_RE: Final = re.compile(NODE_ID_PATTERN)
# Command ids are uuid4 strings in practice; accept any topic-safe token of sane length.
_COMMAND_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

TopicKind = Literal["status", "metrics", "commands", "result", "collector_status"]


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is valid, else raise :class:`ProtocolError`."""
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ProtocolError(
            f"invalid node id {node_id[:80]!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"
        )
    return node_id


def _validate_command_id(command_id: str) -> str:
    if not _COMMAND_ID_RE.fullmatch(command_id):
        raise ProtocolError(f"invalid command id {command_id[:80]!r}")
    return command_id


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a topic names: its kind, the node and, for results, the command."""

    kind: TopicKind
    node_id: str | None = None
    command_id: str | None = None


class Topics:
    """Builds every topic of protocol v1 under one prefix and parses them back."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        """Use ``prefix`` (default ``fleet/v1``) as the root of every topic."""
        prefix = prefix.strip("/")
        if not prefix or any(c in prefix for c in "+#\0"):
            raise ProtocolError(f"invalid topic prefix {prefix!r}: no wildcards, not empty")
        self.prefix = prefix
        # One regex with named groups parses every node topic (as Home Assistant does).
        self._node_re = re.compile(
            re.escape(prefix)
            + r"/nodes/(?P<node_id>[^/]+)/(?:(?P<kind>status|metrics|commands)"
            + r"|results/(?P<command_id>[^/]+))"
        )

    # -- builders -------------------------------------------------------------------
    def status(self, node_id: str) -> str:
        """Retained online/offline/error status of one node."""
        return f"{self.prefix}/nodes/{validate_node_id(node_id)}/status"

    def metrics(self, node_id: str) -> str:
        """Periodic metrics of one node."""
        return f"{self.prefix}/nodes/{validate_node_id(node_id)}/metrics"

    def commands(self, node_id: str) -> str:
        """Commands for one node (never retained)."""
        return f"{self.prefix}/nodes/{validate_node_id(node_id)}/commands"

    def result(self, node_id: str, command_id: str) -> str:
        """Progress and final result of one command on one node."""
        return (
            f"{self.prefix}/nodes/{validate_node_id(node_id)}"
            f"/results/{_validate_command_id(command_id)}"
        )

    def collector_status(self) -> str:
        """Retained birth/Will of the collector."""
        return f"{self.prefix}/collector/status"

    # -- subscriptions --------------------------------------------------------------
    def all_status(self) -> str:
        """Filter matching every node's status."""
        return f"{self.prefix}/nodes/+/status"

    def all_metrics(self) -> str:
        """Filter matching every node's metrics."""
        return f"{self.prefix}/nodes/+/metrics"

    def all_commands(self) -> str:
        """Filter matching every node's command topic."""
        return f"{self.prefix}/nodes/+/commands"

    def all_results(self) -> str:
        """Filter matching every command result of every node."""
        return f"{self.prefix}/nodes/+/results/+"

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """MQTT 5 shared subscription: each message goes to one member of ``group``."""
        # MQTT 5 spec 4.8.2: "$share/{ShareName}/{filter}"; the name is one topic level.
        if not group or any(c in group for c in "/+#\0"):
            raise ProtocolError(f"invalid shared-subscription group {group[:80]!r}")
        return f"$share/{group}/{topic_filter}"

    def node_results(self, node_id: str) -> str:
        """Filter matching every command result of one node."""
        return f"{self.prefix}/nodes/{validate_node_id(node_id)}/results/+"

    # -- parser ---------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Say what ``topic`` names; raise :class:`ProtocolError` if it is not ours."""
        if topic == self.collector_status():
            return ParsedTopic("collector_status")
        match = self._node_re.fullmatch(topic)
        if match is None:
            raise ProtocolError(f"not a protocol v1 topic: {topic[:200]!r}", topic=topic)
        try:
            node_id = validate_node_id(match["node_id"])
            command_id = match["command_id"]
            if command_id is not None:
                return ParsedTopic("result", node_id, _validate_command_id(command_id))
        except ProtocolError as exc:
            raise ProtocolError(str(exc), topic=topic) from exc
        # The regex only lets status|metrics|commands through here.
        kind = cast("TopicKind", match["kind"])
        return ParsedTopic(kind, node_id)
