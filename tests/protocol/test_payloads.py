from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import msgspec
import pytest
from msgspec import ValidationError

from mqfleet.protocol import (
    COMMAND_TERMINAL_STATUSES,
    PROTOCOL_VERSION,
    CollectorStatus,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    MetricsReport,
    StatusReport,
    utc_now,
)

TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


M = TypeVar("M")


def convert(model: type[M], fields: dict[str, Any]) -> M:
    """Check ``fields`` against ``model`` as decoding a payload does (every field)."""
    return msgspec.convert(fields, model)


def birth(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "node_id": "web-01",
        "status": "online",
        "session": 3,
        "ts": "2024-05-01T12:00:00Z",
        "hostname": "web-01.example.com",
        "ip_address": "10.0.0.5",
        "os_info": "Linux 6.1.0 x86_64",
        "agent_version": "0.1.0",
        "interval_s": 10.0,
    }
    fields.update(changes)
    return fields


def metrics(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "node_id": "web-01",
        "session": 3,
        "seq": 0,
        "ts": "2024-05-01T12:00:00Z",
        "cpu_usage": 12.5,
        "memory_usage": 40.0,
        "disk_usage": 71.2,
        "load_average": 0.42,
    }
    fields.update(changes)
    return fields


def command(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "command_id": "0b0d4a8e-4a3b-4d1e-9a5e-1f2d3c4b5a69",
        "node_id": "web-01",
        "command_text": "uptime",
        "timeout_s": 60,
        "created_at": "2024-05-01T12:00:00Z",
        "expires_at": "2024-05-01T12:10:00Z",
        "issuer": "alice@ops",
    }
    fields.update(changes)
    return fields


def test_version_is_one() -> None:
    assert PROTOCOL_VERSION == 1
    assert convert(StatusReport, birth()).v == 1


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_other_versions_are_refused(version: object) -> None:
    with pytest.raises(ValidationError):
        convert(StatusReport, birth(v=version))
    with pytest.raises(ValidationError):
        convert(MetricsReport, metrics(v=version))


def test_online_birth_is_accepted_and_times_are_utc() -> None:
    report = convert(StatusReport, birth(ts="2024-05-01T14:00:00+02:00"))
    assert report.ts == TS
    assert report.ts is not None
    assert report.ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize("missing", ["ts", "hostname", "ip_address"])
def test_online_birth_needs_its_fields(missing: str) -> None:
    fields = birth()
    del fields[missing]
    with pytest.raises(ValidationError, match="online status needs"):
        convert(StatusReport, fields)


def test_will_and_error_need_only_the_core_fields() -> None:
    will = convert(
        StatusReport,
        {"v": 1, "node_id": "n", "status": "offline", "session": 1, "reason": "connection lost"},
    )
    assert will.hostname is None
    error = StatusReport(node_id="n", status="error", session=2, reason="metrics failing")
    assert error.status == "error"


@pytest.mark.parametrize(
    "change",
    [
        {"status": "rebooting"},
        {"session": 0},
        {"session": -1},
        {"session": "3"},
        {"session": 3.5},
        {"interval_s": 0},
        {"interval_s": "10"},
        {"hostname": "h" * 256},
        {"ip_address": "1" * 46},
        {"session": True},
        {"node_id": "a/b"},
        {"node_id": ""},
        {"node_id": "web-01\n"},
        {"node_id": "n" * 65},
        {"ts": "2024-05-01T12:00:00"},  # naive: refused
        {"ts": 1714564800},  # times are RFC 3339 strings, not numbers
        {"ts": "yesterday"},
    ],
)
def test_bad_status_fields_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        convert(StatusReport, birth(**change))


@pytest.mark.parametrize(
    "change",
    [
        {"cpu_usage": -0.1},
        {"cpu_usage": 100.1},
        {"memory_usage": 101},
        {"disk_usage": -5},
        {"load_average": -1},
        {"cpu_usage": float("nan")},
        {"load_average": float("inf")},
        {"cpu_usage": "12.5"},
        {"cpu_usage": None},
        {"seq": -1},
        {"seq": 1.5},
        {"seq": "1"},
        {"session": 0},
        {"ts": "2024-05-01T12:00:00"},
        {"ts": None},
    ],
)
def test_bad_metrics_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        convert(MetricsReport, metrics(**change))


def test_metric_boundaries_are_accepted() -> None:
    low = convert(MetricsReport, metrics(cpu_usage=0, memory_usage=0, disk_usage=0))
    high = convert(MetricsReport, metrics(cpu_usage=100, memory_usage=100, disk_usage=100))
    assert (low.cpu_usage, high.cpu_usage) == (0.0, 100.0)
    assert isinstance(low.cpu_usage, float)


@pytest.mark.parametrize("factory", [birth, metrics, command])
def test_unknown_fields_are_refused(factory: Any) -> None:
    model = {birth: StatusReport, metrics: MetricsReport, command: CommandRequest}[factory]
    with pytest.raises(ValidationError, match="unknown field `cpu_usge`"):
        convert(model, factory(cpu_usge=1))


def test_naive_datetimes_are_refused_from_python_too() -> None:
    with pytest.raises(ValueError, match="ts must carry a UTC offset"):
        MetricsReport(
            node_id="n",
            session=1,
            seq=0,
            ts=datetime(2024, 5, 1, 12, 0),  # noqa: DTZ001 - the point of the test
            cpu_usage=1,
            memory_usage=1,
            disk_usage=1,
            load_average=0,
        )


def test_payloads_are_immutable() -> None:
    report = convert(MetricsReport, metrics())
    with pytest.raises(AttributeError, match="immutable"):
        report.seq = 5  # type: ignore[misc]


def test_collector_status() -> None:
    online = CollectorStatus(status="online", collector_id="mqfleet-collector", ts=utc_now())
    assert online.status == "online"
    with pytest.raises(ValidationError):
        convert(CollectorStatus, {"v": 1, "status": "error", "collector_id": "c"})


def test_command_request_fields() -> None:
    request = convert(CommandRequest, command())
    assert request.timeout_s == 60.0
    assert request.expires_at - request.created_at == timedelta(minutes=10)
    assert request.batch_id is None


@pytest.mark.parametrize(
    "change",
    [
        {"command_text": ""},
        {"command_text": "x" * 65537},
        {"timeout_s": 0},
        {"timeout_s": "60"},
        {"timeout_s": 8 * 86400},
        {"command_id": "a/b"},
        {"command_id": ""},
        {"command_id": "c1\n"},
        {"batch_id": "b/1"},
        {"signature": "s" * 257},
        {"node_id": "+"},
        {"created_at": "2024-05-01T12:00:00"},
        {"issuer": "x" * 256},
    ],
)
def test_bad_commands_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        convert(CommandRequest, command(**change))


def test_started_and_finished_results() -> None:
    started = CommandStarted(command_id="c1", node_id="n", status="running", started_at=TS)
    assert started.status == "running"
    done = CommandFinished(
        command_id="c1",
        node_id="n",
        status="timeout",
        completed_at=TS,
        error="expired before delivery",
    )
    # A command that never started has no start time, exit code or output.
    assert (done.started_at, done.exit_code, done.stdout, done.stdout_truncated) == (
        None,
        None,
        "",
        False,
    )
    assert set(COMMAND_TERMINAL_STATUSES) == {"success", "failed", "timeout"}


@pytest.mark.parametrize(
    "change",
    [
        {"status": "running"},
        {"status": "pending"},
        {"exit_code": "0"},
        {"exit_code": 1.5},
        {"execution_time_ms": -1},
        {"stdout_truncated": "yes"},
        {"stdout_truncated": 1},
        {"exit_code": True},
        {"error": "e" * 1025},
        {"completed_at": "2024-05-01T12:00:00"},
    ],
)
def test_bad_final_results_are_refused(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "v": 1,
        "command_id": "c1",
        "node_id": "n",
        "status": "success",
        "started_at": "2024-05-01T12:00:00Z",
        "completed_at": "2024-05-01T12:00:01Z",
        "exit_code": 0,
    }
    fields.update(change)
    with pytest.raises(ValidationError):
        convert(CommandFinished, fields)


def test_utc_now_is_aware_utc() -> None:
    now = utc_now()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(minutes=1)


def test_python_built_times_are_turned_to_utc() -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    started = CommandStarted(command_id="c1", node_id="n", status="running", started_at=local)
    assert started.started_at == TS
    assert started.started_at.tzinfo is UTC


def test_python_built_floats_are_floats() -> None:
    report = MetricsReport(
        node_id="n", session=1, seq=0, ts=TS, cpu_usage=1, memory_usage=2, disk_usage=3,
        load_average=0,
    )  # fmt: skip
    values = (report.cpu_usage, report.memory_usage, report.disk_usage, report.load_average)
    assert all(type(value) is float for value in values)


def test_rules_that_span_fields_hold_for_python_built_payloads_too() -> None:
    with pytest.raises(ValueError, match="online status needs ts, hostname and ip_address"):
        StatusReport(node_id="n", status="online", session=1, ts=TS)
    with pytest.raises(ValueError, match="load_average must be a finite number"):
        MetricsReport(
            node_id="n", session=1, seq=0, ts=TS, cpu_usage=1, memory_usage=1, disk_usage=1,
            load_average=float("inf"),
        )  # fmt: skip
