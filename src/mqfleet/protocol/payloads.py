"""Payload models of wire protocol v1 (JSON, UTF-8, ``"v": 1``, RFC 3339 UTC times).

These are the wire models; the database tables in ``mqfleet.store`` are separate classes.
They are ``msgspec`` structs: decoding (``mqfleet.protocol.codec``) checks every field,
its type and its limits; unknown fields are refused (``forbid_unknown_fields``), so a typo
in a producer is caught at the receiver instead of silently dropped.

Building a payload in Python checks less, on purpose (msgspec checks types on decode, not
on every ``__init__``): ``__post_init__`` turns times to UTC (refusing naive ones), writes
ints given for float fields as floats, and checks the rules that span fields. A payload
built with an out-of-range value is refused by its receiver.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct
from msgspec.structs import force_setattr

from mqfleet.protocol.topics import NODE_ID_PATTERN

__all__ = [
    "COMMAND_TERMINAL_STATUSES",
    "ERROR_AGENT_RESTARTED",
    "ERROR_EXPIRED_BEFORE_DELIVERY",
    "ERROR_EXPIRED_BEFORE_START",
    "ERROR_NOT_DELIVERED",
    "PROTOCOL_VERSION",
    "REASON_CONNECTION_LOST",
    "REASON_HEARTBEAT_TIMEOUT",
    "REASON_SHUTDOWN",
    "CollectorStatus",
    "CommandFinished",
    "CommandRequest",
    "CommandResultReport",
    "CommandStarted",
    "CommandStatus",
    "MetricsReport",
    "NodeStatus",
    "StatusReport",
    "utc_now",
]

PROTOCOL_VERSION: Final = 1

NodeStatus = Literal["online", "offline", "error"]
CommandStatus = Literal["pending", "running", "success", "failed", "timeout"]
COMMAND_TERMINAL_STATUSES: Final[frozenset[str]] = frozenset({"success", "failed", "timeout"})

# Fixed reason and error texts of protocol v1: producers and consumers share these, and
# operators grep for them, so each is defined here once.
#: StatusReport.reason of the Will registered at CONNECT.
REASON_CONNECTION_LOST: Final = "connection lost"
#: StatusReport.reason of a clean stop (agent or collector).
REASON_SHUTDOWN: Final = "shutdown"
#: nodes.status_reason when the collector hears nothing for 3 x the node's interval.
REASON_HEARTBEAT_TIMEOUT: Final = "heartbeat timeout"
#: CommandFinished.error (timeout) of a command whose expires_at passed before it arrived.
ERROR_EXPIRED_BEFORE_DELIVERY: Final = "expired before delivery"
#: CommandFinished.error (timeout) of a command that expired while queued on the node.
ERROR_EXPIRED_BEFORE_START: Final = "expired before it could start"
#: CommandFinished.error (failed) of a command cut short by an agent crash; never re-run.
ERROR_AGENT_RESTARTED: Final = "agent restarted"
#: command_results.error (timeout) written by the collector for a command never delivered.
ERROR_NOT_DELIVERED: Final = "not delivered before expiry"

_T = TypeVar("_T")


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _always_encoded(value: _T) -> _T:
    """Default ``value`` for a field that ``encode`` writes out even when unchanged.

    ``encode`` leaves out the optional fields that are ``None``: the structs set
    ``omit_defaults``, which omits a value that *is* its field's static default. A default
    made by a factory is never omitted (msgspec docs, "Omitting Default Values"), so
    ``v``, the outputs and the flags are always on the wire, as docs/PROTOCOL.md shows
    (tests/protocol/test_codec.py pins the bytes).
    """
    return msgspec.field(default_factory=lambda: value)


def _as_utc(name: str, value: object) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.utcoffset() is None:
        # Guessing the sender's time zone is how metrics end up an hour off.
        raise ValueError(f"{name} must carry a UTC offset (a naive time is refused)")
    return value.astimezone(UTC)


#: An aware datetime (decoding refuses one without an offset); ``__post_init__`` turns it
#: to UTC, which msgspec encodes as RFC 3339 with a ``Z``.
UtcDatetime = Annotated[datetime, Meta(tz=True)]
# \Z, not $: Python's $ also matches before a trailing newline.
NodeId = Annotated[str, Meta(pattern=rf"^{NODE_ID_PATTERN}\Z")]
CommandId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z")]
# msgspec decodes strictly: "12.5" or "true" in a JSON string is a producer bug to refuse,
# not to coerce, and neither a float nor a bool is an int. (A JSON integer is still a
# valid float.) JSON has no NaN or infinity, and a bound refuses both anyway.
Percent = Annotated[float, Meta(ge=0.0, le=100.0)]
#: Largest session and seq: both are stored in 64-bit signed columns (BIGINT); a bigger
#: one is a protocol error at decode time, never a database error that stops ingest.
INT64_MAX: Final = 2**63 - 1
Session = Annotated[int, Meta(ge=1, le=INT64_MAX)]
ShortText = Annotated[str, Meta(max_length=255)]


class _Payload(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Common configuration of every wire payload."""

    #: Names of the datetime fields, turned to UTC after init and decode.
    _times: ClassVar[tuple[str, ...]] = ()
    #: Names of the float fields: an int given in Python is stored (and sent) as a float.
    _floats: ClassVar[tuple[str, ...]] = ()

    v: Literal[1] = _always_encoded(PROTOCOL_VERSION)

    def __post_init__(self) -> None:
        """Normalise times and floats, then check the rules that span fields.

        msgspec runs this after ``__init__`` and after decoding; on decode a
        ``ValueError`` or ``TypeError`` becomes a ``msgspec.ValidationError``.
        """
        for name in self._times:
            value = getattr(self, name)
            if value is not None and getattr(value, "tzinfo", None) is not UTC:
                force_setattr(self, name, _as_utc(name, value))
        for name in self._floats:
            value = getattr(self, name)
            if type(value) is int:
                force_setattr(self, name, float(value))
        self._check()

    def _check(self) -> None:
        """Raise ``ValueError`` if fields contradict each other (none do by default)."""


class StatusReport(_Payload, kw_only=True, frozen=True):
    """Retained node status: birth (online), Will or shutdown (offline), or error."""

    _times = ("ts",)
    _floats = ("interval_s",)

    node_id: NodeId
    status: NodeStatus
    #: Strictly increases on every new connection of the node, across agent restarts.
    session: Session
    ts: UtcDatetime | None = None
    hostname: ShortText | None = None
    ip_address: Annotated[str, Meta(max_length=45)] | None = None
    os_info: ShortText | None = None
    agent_version: Annotated[str, Meta(max_length=64)] | None = None
    interval_s: Annotated[float, Meta(gt=0, le=86400)] | None = None
    reason: ShortText | None = None

    def _check(self) -> None:
        if self.status == "online" and (
            self.ts is None or self.hostname is None or self.ip_address is None
        ):
            msg = "an online status needs ts, hostname and ip_address"
            raise ValueError(msg)


class MetricsReport(_Payload, kw_only=True, frozen=True):
    """One metrics sample of one node."""

    _times = ("ts",)
    _floats = ("cpu_usage", "memory_usage", "disk_usage", "load_average")

    node_id: NodeId
    session: Session
    #: Increases per session, so gaps and duplicates are visible.
    seq: Annotated[int, Meta(ge=0, le=INT64_MAX)]
    ts: UtcDatetime
    cpu_usage: Percent
    memory_usage: Percent
    disk_usage: Percent
    load_average: Annotated[float, Meta(ge=0.0)]

    def _check(self) -> None:
        # JSON cannot carry infinity, but a Python caller (or msgspec.convert) can.
        if not math.isfinite(self.load_average):
            msg = "load_average must be a finite number"
            raise ValueError(msg)


class CollectorStatus(_Payload, kw_only=True, frozen=True):
    """Retained birth/Will of the collector, so the CLI can warn when nothing records."""

    _times = ("ts",)

    status: Literal["online", "offline"]
    collector_id: Annotated[str, Meta(max_length=128)]
    ts: UtcDatetime | None = None
    reason: ShortText | None = None


class CommandRequest(_Payload, kw_only=True, frozen=True):
    """A shell command for one node; published with QoS 1, never retained."""

    _times = ("created_at", "expires_at")
    _floats = ("timeout_s",)

    command_id: CommandId
    node_id: NodeId
    command_text: Annotated[str, Meta(min_length=1, max_length=65536)]
    timeout_s: Annotated[float, Meta(gt=0, le=7 * 86400)]
    created_at: UtcDatetime
    expires_at: UtcDatetime
    issuer: Annotated[str, Meta(max_length=255)]
    batch_id: CommandId | None = None
    #: Operator's Ed25519 signature over the canonical fields (``mqfleet.security.signing``):
    #: ``<key id>:<base64 signature>``. Omitted on the wire when unsigned.
    signature: Annotated[str, Meta(max_length=256)] | None = None


class CommandStarted(_Payload, kw_only=True, frozen=True):
    """Sent by the agent when a command starts running."""

    _times = ("started_at",)

    command_id: CommandId
    node_id: NodeId
    status: Literal["running"]
    started_at: UtcDatetime


class CommandFinished(_Payload, kw_only=True, frozen=True):
    """Final result of a command: success (exit 0), failed, or timeout."""

    _times = ("started_at", "completed_at")

    command_id: CommandId
    node_id: NodeId
    status: Literal["success", "failed", "timeout"]
    #: None when the command never started (expired, refused, could not be spawned).
    started_at: UtcDatetime | None = None
    completed_at: UtcDatetime
    exit_code: int | None = None
    stdout: str = _always_encoded("")
    stderr: str = _always_encoded("")
    execution_time_ms: Annotated[int, Meta(ge=0)] = _always_encoded(0)
    stdout_truncated: bool = _always_encoded(False)  # noqa: FBT003 - a field default
    stderr_truncated: bool = _always_encoded(False)  # noqa: FBT003 - a field default
    error: Annotated[str, Meta(max_length=1024)] | None = None


#: What the results topic carries: a ``running`` notice or a final result, told apart by
#: ``status`` (``mqfleet.protocol.decode_result``).
CommandResultReport = CommandStarted | CommandFinished
