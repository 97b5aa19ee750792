"""Payload models of wire protocol v1 (JSON, UTF-8, ``"v": 1``, RFC 3339 UTC times).

These are the wire models; the database tables in ``mqfleet.store`` are separate classes.
Unknown fields are refused (``extra="forbid"``): a typo in a producer is caught at the
collector instead of silently dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

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


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


#: An aware datetime, normalised to UTC, written as RFC 3339 with a ``Z``.
UtcDatetime = Annotated[
    AwareDatetime,
    AfterValidator(_to_utc),
    PlainSerializer(_rfc3339, return_type=str, when_used="json"),
]
NodeId = Annotated[str, Field(pattern=f"^{NODE_ID_PATTERN}$")]
CommandId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# Numbers and flags are strict: "12.5" or "true" in a JSON string is a producer bug to
# refuse, not to coerce. (A JSON integer is still a valid float.)
Percent = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, strict=True)]
Session = Annotated[int, Field(ge=1, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
ShortText = Annotated[str, Field(max_length=255)]


class _Payload(BaseModel):
    """Common configuration of every wire payload."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    v: Literal[1] = PROTOCOL_VERSION


class StatusReport(_Payload):
    """Retained node status: birth (online), Will or shutdown (offline), or error."""

    node_id: NodeId
    status: NodeStatus
    #: Strictly increases on every new connection of the node, across agent restarts.
    session: Session
    ts: UtcDatetime | None = None
    hostname: Annotated[str, Field(max_length=255)] | None = None
    ip_address: Annotated[str, Field(max_length=45)] | None = None
    os_info: ShortText | None = None
    agent_version: Annotated[str, Field(max_length=64)] | None = None
    interval_s: Annotated[float, Field(gt=0, le=86400, strict=True)] | None = None
    reason: ShortText | None = None

    @model_validator(mode="after")
    def _birth_is_complete(self) -> StatusReport:
        if self.status == "online" and (
            self.ts is None or self.hostname is None or self.ip_address is None
        ):
            msg = "an online status needs ts, hostname and ip_address"
            raise ValueError(msg)
        return self


class MetricsReport(_Payload):
    """One metrics sample of one node."""

    node_id: NodeId
    session: Session
    #: Increases per session, so gaps and duplicates are visible.
    seq: Annotated[int, Field(ge=0, strict=True)]
    ts: UtcDatetime
    cpu_usage: Percent
    memory_usage: Percent
    disk_usage: Percent
    load_average: Annotated[float, Field(ge=0.0, allow_inf_nan=False, strict=True)]


class CollectorStatus(_Payload):
    """Retained birth/Will of the collector, so the CLI can warn when nothing records."""

    status: Literal["online", "offline"]
    collector_id: Annotated[str, Field(max_length=128)]
    ts: UtcDatetime | None = None
    reason: ShortText | None = None


class CommandRequest(_Payload):
    """A shell command for one node; published with QoS 1, never retained."""

    command_id: CommandId
    node_id: NodeId
    command_text: Annotated[str, Field(min_length=1, max_length=65536)]
    timeout_s: Annotated[float, Field(gt=0, le=7 * 86400, strict=True)]
    created_at: UtcDatetime
    expires_at: UtcDatetime
    issuer: Annotated[str, Field(max_length=255)]
    batch_id: CommandId | None = None
    #: Operator's Ed25519 signature over the canonical fields (``mqfleet.security.signing``):
    #: ``<key id>:<base64 signature>``. Omitted on the wire when unsigned.
    signature: Annotated[str, Field(max_length=256)] | None = None


class CommandStarted(_Payload):
    """Sent by the agent when a command starts running."""

    command_id: CommandId
    node_id: NodeId
    status: Literal["running"]
    started_at: UtcDatetime


class CommandFinished(_Payload):
    """Final result of a command: success (exit 0), failed, or timeout."""

    command_id: CommandId
    node_id: NodeId
    status: Literal["success", "failed", "timeout"]
    #: None when the command never started (expired, refused, could not be spawned).
    started_at: UtcDatetime | None = None
    completed_at: UtcDatetime
    exit_code: Annotated[int, Field(strict=True)] | None = None
    stdout: str = ""
    stderr: str = ""
    execution_time_ms: Annotated[int, Field(ge=0, strict=True)] = 0
    stdout_truncated: Flag = False
    stderr_truncated: Flag = False
    error: Annotated[str, Field(max_length=1024)] | None = None


#: What the results topic carries: a ``running`` notice or a final result.
CommandResultReport = Annotated[
    CommandStarted | CommandFinished, Field(discriminator="status")
]
