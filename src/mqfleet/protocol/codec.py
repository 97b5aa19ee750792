"""Encoding and decoding of protocol v1 payloads, with size limits per topic kind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from mqfleet.errors import ProtocolError
from mqfleet.protocol.payloads import (
    CollectorStatus,
    CommandFinished,
    CommandRequest,
    CommandResultReport,
    CommandStarted,
    MetricsReport,
    StatusReport,
)

if TYPE_CHECKING:
    from mqfleet.protocol.topics import TopicKind

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "decode_collector_status",
    "decode_command",
    "decode_metrics",
    "decode_result",
    "decode_status",
    "encode",
    "truncate_for_log",
]

#: Largest payload accepted per topic kind. A result carries two output streams of at
#: most 64 KiB each; JSON escaping can grow control bytes six-fold, hence 1 MiB.
MAX_PAYLOAD_BYTES: Final[dict[TopicKind, int]] = {
    "status": 16 * 1024,
    "metrics": 16 * 1024,
    "collector_status": 16 * 1024,
    "commands": 256 * 1024,
    "result": 1024 * 1024,
}

_M = TypeVar("_M", bound=BaseModel)
_RESULT_ADAPTER: Final = TypeAdapter[CommandStarted | CommandFinished](CommandResultReport)


def encode(payload: BaseModel) -> bytes:
    """Serialise a payload model to compact UTF-8 JSON."""
    return payload.model_dump_json(exclude_none=True).encode()


def truncate_for_log(payload: bytes | str, limit: int = 200) -> str:
    """Render a payload for a log line, cut to ``limit`` characters."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _check_size(payload: bytes, kind: TopicKind) -> None:
    limit = MAX_PAYLOAD_BYTES[kind]
    if len(payload) > limit:
        raise ProtocolError(f"{kind} payload of {len(payload)} bytes exceeds {limit} bytes")


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        # Messages may quote the offending input: keep the line one line, and short.
        msg = truncate_for_log(" ".join(str(err["msg"]).split()), 120)
        parts.append(f"{truncate_for_log(where, 80)}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _decode(model: type[_M], payload: bytes, kind: TopicKind) -> _M:
    _check_size(payload, kind)
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {kind} payload: {_one_line(exc)}") from exc


def decode_status(payload: bytes) -> StatusReport:
    """Decode a node status payload."""
    return _decode(StatusReport, payload, "status")


def decode_metrics(payload: bytes) -> MetricsReport:
    """Decode a metrics payload."""
    return _decode(MetricsReport, payload, "metrics")


def decode_collector_status(payload: bytes) -> CollectorStatus:
    """Decode the collector's status payload."""
    return _decode(CollectorStatus, payload, "collector_status")


def decode_command(payload: bytes) -> CommandRequest:
    """Decode a command request payload."""
    return _decode(CommandRequest, payload, "commands")


def decode_result(payload: bytes) -> CommandStarted | CommandFinished:
    """Decode a command result payload (``running`` or final)."""
    _check_size(payload, "result")
    try:
        return _RESULT_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid result payload: {_one_line(exc)}") from exc
