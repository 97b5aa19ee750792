"""Encoding and decoding of protocol v1 payloads, with size limits per topic kind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal, TypeVar

import msgspec

from mqfleet.errors import ProtocolError
from mqfleet.protocol.payloads import (
    CollectorStatus,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    StatusReport,
)

if TYPE_CHECKING:
    from mqfleet.protocol.payloads import CommandResultReport
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

#: Every payload model ``encode`` accepts.
_WirePayload = (
    StatusReport
    | MetricsReport
    | CollectorStatus
    | CommandRequest
    | CommandStarted
    | CommandFinished
)
_M = TypeVar("_M", bound=msgspec.Struct)

# Encoders and decoders are thread-safe (the collector decodes on paho's thread), and
# one per type is the fast way to use them (msgspec docs, "Performance Tips").
_ENCODER: Final = msgspec.json.Encoder()
_STATUS: Final = msgspec.json.Decoder(StatusReport)
_METRICS: Final = msgspec.json.Decoder(MetricsReport)
_COLLECTOR_STATUS: Final = msgspec.json.Decoder(CollectorStatus)
_COMMAND: Final = msgspec.json.Decoder(CommandRequest)
_STARTED: Final = msgspec.json.Decoder(CommandStarted)
_FINISHED: Final = msgspec.json.Decoder(CommandFinished)


class _ResultKind(msgspec.Struct):
    """Only the ``status`` of a result payload: which of the two models it is."""

    status: Literal["running", "success", "failed", "timeout"]


_RESULT_KIND: Final = msgspec.json.Decoder(_ResultKind)
#: How many missing fields an error message names before it says "(+N more)".
_NAMED_FIELDS: Final = 3


def encode(payload: _WirePayload) -> bytes:
    """Serialise a payload model to compact UTF-8 JSON (``None`` fields left out)."""
    return _ENCODER.encode(payload)


def truncate_for_log(payload: bytes | str, limit: int = 200) -> str:
    """Render a payload for a log line, cut to ``limit`` characters."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _check_size(payload: bytes, kind: TopicKind) -> None:
    limit = MAX_PAYLOAD_BYTES[kind]
    if len(payload) > limit:
        raise ProtocolError(f"{kind} payload of {len(payload)} bytes exceeds {limit} bytes")


def _missing_fields(model: type[msgspec.Struct], payload: bytes) -> list[str]:
    """Name every required field of ``model`` that ``payload`` lacks (msgspec names one)."""
    try:
        given = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return []
    if not isinstance(given, dict):
        return []
    return [
        f.encode_name
        for f in msgspec.structs.fields(model)
        if f.required and f.encode_name not in given
    ]


def _error(kind: TopicKind, model: type[msgspec.Struct], payload: bytes, exc: Exception) -> str:
    """Say in one short line why ``payload`` is not a valid ``kind`` payload."""
    text = str(exc)
    # msgspec stops at the first missing field; naming them all saves round trips.
    missing = _missing_fields(model, payload) if text.startswith("Object missing") else []
    if len(missing) > 1:
        more = len(missing) - _NAMED_FIELDS
        named = ", ".join(f"`{name}`" for name in missing[:_NAMED_FIELDS])
        reason = f"missing required fields {named}" + (f" (+{more} more)" if more > 0 else "")
    else:
        # Messages may quote the offending input: keep the line one line, and short.
        reason = truncate_for_log(" ".join(text.split()), 200)
    return f"invalid {kind} payload: {reason}"


def _decode(
    decoder: msgspec.json.Decoder[_M], model: type[_M], payload: bytes, kind: TopicKind
) -> _M:
    _check_size(payload, kind)
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ProtocolError(_error(kind, model, payload, exc)) from exc


def decode_status(payload: bytes) -> StatusReport:
    """Decode a node status payload."""
    return _decode(_STATUS, StatusReport, payload, "status")


def decode_metrics(payload: bytes) -> MetricsReport:
    """Decode a metrics payload."""
    return _decode(_METRICS, MetricsReport, payload, "metrics")


def decode_collector_status(payload: bytes) -> CollectorStatus:
    """Decode the collector's status payload."""
    return _decode(_COLLECTOR_STATUS, CollectorStatus, payload, "collector_status")


def decode_command(payload: bytes) -> CommandRequest:
    """Decode a command request payload."""
    return _decode(_COMMAND, CommandRequest, payload, "commands")


def decode_result(payload: bytes) -> CommandResultReport:
    """Decode a command result payload (``running`` or final), told apart by ``status``."""
    _check_size(payload, "result")
    try:
        # Final results are the big ones: try them first, so they are parsed once.
        return _FINISHED.decode(payload)
    except msgspec.DecodeError as exc:
        finished_error = exc
    # Not a valid final result: let its status say which model's complaint to report.
    kind = _decode(_RESULT_KIND, _ResultKind, payload, "result")
    if kind.status != "running":
        raise ProtocolError(
            _error("result", CommandFinished, payload, finished_error)
        ) from finished_error
    return _decode(_STARTED, CommandStarted, payload, "result")
