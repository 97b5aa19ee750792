from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from mqfleet.errors import ProtocolError
from mqfleet.protocol import (
    MAX_PAYLOAD_BYTES,
    CollectorStatus,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    StatusReport,
    decode_collector_status,
    decode_command,
    decode_metrics,
    decode_result,
    decode_status,
    encode,
    truncate_for_log,
)

TS = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)


def sample_metrics(**changes: object) -> MetricsReport:
    fields: dict[str, object] = {
        "node_id": "web-01",
        "session": 7,
        "seq": 41,
        "ts": TS,
        "cpu_usage": 12.5,
        "memory_usage": 40.0,
        "disk_usage": 71.2,
        "load_average": 0.42,
    }
    fields.update(changes)
    return msgspec.convert(fields, MetricsReport)


def test_metrics_round_trip() -> None:
    report = sample_metrics()
    assert decode_metrics(encode(report)) == report


def test_status_round_trip_birth_and_will() -> None:
    born = StatusReport(
        node_id="n",
        status="online",
        session=2,
        ts=TS,
        hostname="h",
        ip_address="::1",
        os_info="Linux",
        agent_version="0.1.0",
        interval_s=10,
    )
    will = StatusReport(node_id="n", status="offline", session=2, reason="connection lost")
    assert decode_status(encode(born)) == born
    assert decode_status(encode(will)) == will
    # Unset optional fields are left out, not sent as null.
    assert json.loads(encode(will)) == {
        "v": 1,
        "node_id": "n",
        "status": "offline",
        "session": 2,
        "reason": "connection lost",
    }


def test_collector_status_round_trip() -> None:
    status = CollectorStatus(status="offline", collector_id="c", reason="connection lost")
    assert decode_collector_status(encode(status)) == status


def test_command_and_results_round_trip() -> None:
    request = CommandRequest(
        command_id="c1",
        node_id="n",
        command_text="echo 'héllo' | wc -c",
        timeout_s=60,
        created_at=TS,
        expires_at=TS + timedelta(minutes=10),
        issuer="alice",
        batch_id="b1",
    )
    assert decode_command(encode(request)) == request
    started = CommandStarted(command_id="c1", node_id="n", status="running", started_at=TS)
    finished = CommandFinished(
        command_id="c1",
        node_id="n",
        status="failed",
        started_at=TS,
        completed_at=TS + timedelta(seconds=1),
        exit_code=127,
        stderr="sh: 1: nope: not found\n\ufffd",
        execution_time_ms=1000,
        stderr_truncated=True,
    )
    assert decode_result(encode(started)) == started
    decoded = decode_result(encode(finished))
    assert isinstance(decoded, CommandFinished)
    assert decoded == finished


def test_result_kind_follows_the_status_field() -> None:
    running = decode_result(
        b'{"v":1,"command_id":"c","node_id":"n","status":"running",'
        b'"started_at":"2024-05-01T12:00:00Z"}'
    )
    assert isinstance(running, CommandStarted)
    with pytest.raises(ProtocolError, match="invalid result payload"):
        decode_result(b'{"v":1,"command_id":"c","node_id":"n","status":"pending"}')


def test_times_are_rfc3339_utc_with_z() -> None:
    local = datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    wire = json.loads(encode(sample_metrics(ts=local)))
    assert wire["ts"] == "2024-05-01T12:00:00.250000Z"
    assert decode_metrics(encode(sample_metrics(ts=local))).ts == TS


def test_encoding_is_compact_utf8_json() -> None:
    raw = encode(CommandStarted(command_id="c", node_id="n", status="running", started_at=TS))
    assert b" " not in raw
    assert b"\n" not in raw
    raw.decode("utf-8")


@pytest.mark.parametrize(
    ("decode", "kind"),
    [
        (decode_status, "status"),
        (decode_metrics, "metrics"),
        (decode_collector_status, "collector_status"),
        (decode_command, "commands"),
        (decode_result, "result"),
    ],
)
def test_oversized_payloads_are_refused_before_parsing(decode: object, kind: str) -> None:
    limit = MAX_PAYLOAD_BYTES[kind]  # type: ignore[index]
    payload = b'{"pad":"' + b"x" * limit + b'"}'
    with pytest.raises(ProtocolError, match=f"exceeds {limit} bytes"):
        decode(payload)  # type: ignore[operator]


def test_size_limits_fit_the_broker_and_the_output_caps() -> None:
    # Two 64 KiB output streams, JSON-escaped at worst 6x, fit a result payload,
    # and every limit fits mosquitto's max_packet_size (2 MiB) in broker/mosquitto.conf.
    assert MAX_PAYLOAD_BYTES["result"] >= 2 * 64 * 1024 * 6
    assert max(MAX_PAYLOAD_BYTES.values()) < 2 * 1024 * 1024


def test_a_big_result_at_the_output_cap_still_decodes() -> None:
    finished = CommandFinished(
        command_id="c",
        node_id="n",
        status="success",
        started_at=TS,
        completed_at=TS,
        exit_code=0,
        stdout="\x01" * 64 * 1024,  # escapes to \u0001: six bytes each
        stderr="é" * 32 * 1024,
        stdout_truncated=True,
    )
    raw = encode(finished)
    assert len(raw) > 6 * 64 * 1024
    assert decode_result(raw) == finished


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b"null",
        b'"online"',
        b"{",
        b'{"v":1}',
        b'{"v":1,"node_id":"n","status":"online","session":1}',
        b'{"v":2,"node_id":"n","status":"offline","session":1}',
        b'{"v":1,"node_id":"n","status":"offline","session":1,"extra":true}',
        b'{"v":1,"node_id":"n/x","status":"offline","session":1}',
        b'{"v":1,"node_id":"n\\n","status":"offline","session":1}',
        b'{"v":1,"node_id":"n","status":"offline","session":true}',
        b'{"v":1,"node_id":"n","status":"offline","session":"1"}',
        b'{"v":1,"node_id":"n","status":"offline","session":1,"ts":"2024-05-01T12:00:00"}',
    ],
)
def test_garbage_is_a_one_line_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_status(payload)
    message = str(info.value)
    assert message.startswith("invalid status payload")
    assert "\n" not in message
    assert len(message) < 600


def test_error_messages_do_not_echo_multiline_input() -> None:
    hostile = json.dumps(
        {"v": 1, "command_id": "c", "node_id": "n", "status": "x\n" * 1000}
    ).encode()
    with pytest.raises(ProtocolError) as info:
        decode_result(hostile)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 600


def test_many_errors_are_summarised() -> None:
    with pytest.raises(ProtocolError, match=r"\(\+\d+ more\)"):
        decode_metrics(b'{"v":1}')
    with pytest.raises(ProtocolError) as info:
        decode_metrics(b'{"v":1}')
    assert str(info.value) == (
        "invalid metrics payload: missing required fields `node_id`, `session`, `seq` (+5 more)"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"v":1,"node_id":"n","status":"offline","session":1,"cpu_usge":1}', "unknown field"),
        (b'{"v":1,"node_id":"n","status":"offline","session":"1"}', "`$.session`"),
        (b'{"v":1,"node_id":"n","status":"online","session":1}', "online status needs ts"),
        (b'{"v":1,"node_id":"n","status":"offline","session":1,"ts":"2024-05-01T12"}', "RFC3339"),
        (
            b'{"v":1,"node_id":"n","status":"offline","session":1,"ts":"2024-05-01T12:00:00"}',
            "with a timezone",
        ),
        (b'{"v":2,"node_id":"n","status":"offline","session":1}', "`$.v`"),
        (b"not json", "malformed"),
    ],
)  # fmt: skip
def test_refusals_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=r"^invalid status payload: ") as info:
        decode_status(payload)
    assert reason in str(info.value)


def test_a_bad_result_is_judged_by_the_model_its_status_names() -> None:
    running = b'{"v":1,"command_id":"c","node_id":"n","status":"running"}'
    with pytest.raises(ProtocolError, match="missing required field `started_at`"):
        decode_result(running)
    finished = b'{"v":1,"command_id":"c","node_id":"n","status":"failed","exit_code":"1"}'
    with pytest.raises(ProtocolError, match=r"got `str` - at `\$.exit_code`"):
        decode_result(finished)
    with pytest.raises(ProtocolError, match="missing required field `status`"):
        decode_result(b'{"v":1,"command_id":"c","node_id":"n"}')


# What encode() wrote with the pydantic models (mqfleet 0.1.0): receivers, stored commands
# and signatures may depend on these exact bytes.
LOCAL = datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ENCODED = [
    (
        StatusReport(
            node_id="web-01", status="online", session=7, ts=LOCAL,
            hostname="web-01.example.com", ip_address="10.0.0.5", os_info="Linux",
            agent_version="0.1.0", interval_s=10,
        ),
        (
            b'{"v":1,"node_id":"web-01","status":"online","session":7,'
            b'"ts":"2024-05-01T12:00:00.250000Z","hostname":"web-01.example.com",'
            b'"ip_address":"10.0.0.5","os_info":"Linux","agent_version":"0.1.0","interval_s":10.0}'
        ),
    ),
    (
        StatusReport(node_id="web-01", status="offline", session=7, reason="connection lost"),
        b'{"v":1,"node_id":"web-01","status":"offline","session":7,"reason":"connection lost"}',
    ),
    (
        MetricsReport(
            node_id="web-01", session=7, seq=42, ts=NOON, cpu_usage=12, memory_usage=40.1,
            disk_usage=100, load_average=0,
        ),
        (
            b'{"v":1,"node_id":"web-01","session":7,"seq":42,"ts":"2024-05-01T12:00:00Z",'
            b'"cpu_usage":12.0,"memory_usage":40.1,"disk_usage":100.0,"load_average":0.0}'
        ),
    ),
    (
        CollectorStatus(status="online", collector_id="c", ts=NOON),
        b'{"v":1,"status":"online","collector_id":"c","ts":"2024-05-01T12:00:00Z"}',
    ),
    (
        CommandRequest(
            command_id="c1", node_id="n", command_text="echo 'h\u00e9llo' \"q\" \\ \x01",
            timeout_s=60, created_at=NOON, expires_at=LOCAL, issuer="alice", batch_id="b1",
            signature="k:abc=",
        ),
        (
            b'{"v":1,"command_id":"c1","node_id":"n",'
            b'"command_text":"echo \'h\xc3\xa9llo\' \\"q\\" \\\\ \\u0001","timeout_s":60.0,'
            b'"created_at":"2024-05-01T12:00:00Z","expires_at":"2024-05-01T12:00:00.250000Z",'
            b'"issuer":"alice","batch_id":"b1","signature":"k:abc="}'
        ),
    ),
    (
        CommandStarted(command_id="c1", node_id="n", status="running", started_at=LOCAL),
        (
            b'{"v":1,"command_id":"c1","node_id":"n","status":"running",'
            b'"started_at":"2024-05-01T12:00:00.250000Z"}'
        ),
    ),
    (
        CommandFinished(
            command_id="c1", node_id="n", status="timeout", completed_at=NOON,
            error="expired before delivery",
        ),
        (
            b'{"v":1,"command_id":"c1","node_id":"n","status":"timeout",'
            b'"completed_at":"2024-05-01T12:00:00Z","stdout":"","stderr":"","execution_time_ms":0,'
            b'"stdout_truncated":false,"stderr_truncated":false,"error":"expired before delivery"}'
        ),
    ),
    (
        CommandFinished(
            command_id="c1", node_id="n", status="success", started_at=NOON, completed_at=LOCAL,
            exit_code=0, stdout="ok\n\u2028\U0001f600", stderr="", execution_time_ms=15,
            stdout_truncated=True,
        ),
        (
            b'{"v":1,"command_id":"c1","node_id":"n","status":"success",'
            b'"started_at":"2024-05-01T12:00:00Z","completed_at":"2024-05-01T12:00:00.250000Z",'
            b'"exit_code":0,"stdout":"ok\\n\xe2\x80\xa8\xf0\x9f\x98\x80","stderr":"",'
            b'"execution_time_ms":15,"stdout_truncated":true,"stderr_truncated":false}'
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "expected"), ENCODED, ids=lambda p: type(p).__name__)
def test_encoded_bytes_are_unchanged(payload: object, expected: bytes) -> None:
    # Only None is left out: v, empty outputs, zero and false flags are always written.
    assert encode(payload) == expected  # type: ignore[arg-type]


def test_truncate_for_log() -> None:
    assert truncate_for_log(b"short") == "short"
    long = truncate_for_log(b"x" * 1000, limit=10)
    assert long == "xxxxxxxxxx... (1000 chars)"
    assert truncate_for_log(b"\xff") == "\ufffd"


@pytest.mark.parametrize("field", ["session", "seq"])
def test_session_and_seq_fit_the_64_bit_columns(field: str) -> None:
    # Both are BIGINT in the store: a bigger value must be refused here, as a protocol
    # error, not reach SQLite as an OverflowError that would stop the collector's writer.
    largest = json.loads(encode(sample_metrics()))
    largest[field] = 2**63 - 1
    assert getattr(decode_metrics(json.dumps(largest).encode()), field) == 2**63 - 1
    largest[field] = 2**63
    with pytest.raises(ProtocolError, match=field):
        decode_metrics(json.dumps(largest).encode())
    status = {"v": 1, "node_id": "web-01", "status": "offline", "session": 2**63}
    with pytest.raises(ProtocolError, match="session"):
        decode_status(json.dumps(status).encode())
