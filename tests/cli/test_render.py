from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import click
import msgspec
import pytest

from mqfleet.cli import render
from mqfleet.cli.exitcodes import ExitCode
from mqfleet.cli.outcomes import RunReport, TargetOutcome
from mqfleet.protocol import CommandFinished
from mqfleet.store.queries import CommandDetail, CommandRow, MetricRow, NodeDetail, NodeRow

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def node(node_id: str = "web-1", status: str = "online", seen_s: float = 5.0) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        hostname="web1.example",
        ip_address="10.0.0.1",
        os_info="Linux",
        status=status,
        status_reason=None if status == "online" else "connection lost",
        last_heartbeat=NOW - timedelta(seconds=seen_s),
        registered_at=NOW - timedelta(days=2),
        updated_at=NOW,
        session=3,
        interval_s=10.0,
        agent_version="0.1.0",
    )


def command_row(**kw: object) -> CommandRow:
    values: dict[str, object] = {
        "command_id": "c1",
        "target_node_id": "web-1",
        "command_text": "echo hi",
        "status": "success",
        "created_at": NOW - timedelta(minutes=2),
        "started_at": NOW - timedelta(minutes=2),
        "completed_at": NOW - timedelta(minutes=1),
        "expires_at": NOW + timedelta(minutes=8),
        "timeout_s": 60.0,
        "issuer": "alice@laptop",
        "batch_id": "b1",
        "exit_code": 0,
        "execution_time_ms": 1500,
        "error": None,
    }
    values.update(kw)
    return CommandRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=12), "12s ago"),
        (timedelta(minutes=5, seconds=3), "5m ago"),
        (timedelta(hours=3), "3h ago"),
        (timedelta(days=2, hours=1), "2d ago"),
        (timedelta(minutes=-5), "in 5m"),
        (timedelta(milliseconds=-500), "0s ago"),
    ],
)
def test_format_age(delta: timedelta, expected: str) -> None:
    assert render.format_age(NOW - delta, NOW) == expected


def test_format_age_never_and_durations() -> None:
    assert render.format_age(None, NOW) == "never"
    assert render.format_duration_ms(None) == "-"
    assert render.format_duration_ms(850) == "850 ms"
    assert render.format_duration_ms(1500) == "1.5 s"
    assert render.format_duration_ms(125_000) == "2m 05s"


def test_colour_only_on_a_terminal_and_never_with_no_color() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert render.use_colour(Tty(), {})
    assert not render.use_colour(Tty(), {"NO_COLOR": "1"})
    assert not render.use_colour(io.StringIO(), {})


def test_nodes_table_plain_and_coloured() -> None:
    rows = [node("web-1"), node("db-10", "offline", seen_s=3600)]
    plain = render.nodes_table(rows, NOW, colour=False)
    lines = plain.splitlines()
    header = ["NODE", "STATUS", "LAST", "SEEN", "HOSTNAME", "IP", "AGENT", "REASON"]
    assert lines[0].split() == header
    assert "5s ago" in lines[1]
    assert "1h ago" in lines[2]
    assert "connection lost" in lines[2]
    assert "\x1b[" not in plain
    # Columns line up: the status column starts at the same offset on every line.
    assert lines[1].index("online") == lines[2].index("offline") == lines[0].index("STATUS")
    coloured = render.nodes_table(rows, NOW, colour=True)
    assert "\x1b[32monline" in coloured
    assert click.unstyle(coloured) == plain


def test_node_json_fields_are_stable() -> None:
    doc = render.node_json(node())
    assert list(doc) == [
        "node_id", "hostname", "ip_address", "os_info", "status", "status_reason",
        "last_heartbeat", "registered_at", "updated_at", "session", "interval_s",
        "agent_version",
    ]  # fmt: skip
    assert doc["last_heartbeat"] == "2026-11-30T11:59:55Z"


def test_nodes_and_metrics_json_encode_the_rows_as_node_json_and_metric_json() -> None:
    # The list documents encode the rows as they are: their fields must stay the
    # documented objects, in the same order.
    rows = [node("web-1"), node("db-2", "offline", seen_s=3600.5)]
    listed = json.loads(render.dumps(render.nodes_json(rows)))
    assert list(listed) == ["nodes"]
    assert [list(n.items()) for n in listed["nodes"]] == [
        list(render.node_json(n).items()) for n in rows
    ]
    metric = MetricRow("web-1", NOW - timedelta(microseconds=1500), 12.345, None, 70.25, 0.5)
    doc = json.loads(render.dumps(render.metrics_json("web-1", [metric])))
    assert list(doc) == ["node_id", "metrics"]
    assert list(doc["metrics"][0].items()) == list(render.metric_json(metric).items())
    assert doc["metrics"][0]["metric_time"] == "2026-11-30T11:59:59.998500Z"


def test_dumps_writes_what_json_dumps_wrote() -> None:
    document = {
        "text": 'caf\u00e9 "quoted" \\ \n\t\x01\x7f \u2028 \U0001f600',
        "numbers": [0, -1, 2**63, 1.5, 0.1 + 0.2, 12.345, 1e15, 100.0],
        "empty": {"list": [], "object": {}},
        "flags": [True, False, None],
        "nested": [{"a": [{"b": []}]}],
    }
    assert render.dumps(document) == json.dumps(document, indent=2, ensure_ascii=False)
    assert render.dumps({"nodes": []}) == '{\n  "nodes": []\n}'


def test_dumps_keeps_a_lone_surrogate_for_the_stream_to_replace() -> None:
    # An agent's JSON may carry "\udcff"; UTF-8 cannot, so the stdlib encoder writes it
    # (the CLI's stdout replaces it) instead of failing the command.
    document = {"stdout": "out \udcff", "when": NOW, "row": node()}
    text = render.dumps(document)
    assert '"stdout": "out \udcff"' in text
    assert '"when": "2026-11-30T12:00:00Z"' in text
    assert json.loads(text)["row"] == render.node_json(node())


def test_stale_nodes_warn_when_nothing_records() -> None:
    fresh, stale, offline = node("a", seen_s=5), node("b", seen_s=600), node("c", "offline", 600)
    assert render.stale_nodes([fresh, stale, offline], NOW) == [stale]
    warning = render.stale_warning([stale], NOW)
    assert warning is not None
    assert "10m ago" in warning
    assert "collector" in warning
    assert render.stale_warning([], NOW) is None


def test_stale_nodes_take_each_nodes_interval() -> None:
    slow = msgspec.structs.replace(node("slow", seen_s=600), interval_s=300.0)
    never = msgspec.structs.replace(node("never"), last_heartbeat=None)
    # An interval beyond any datetime (only a hand-edited row can hold one) is never stale.
    huge = msgspec.structs.replace(node("huge", seen_s=86400 * 365), interval_s=1e300)
    fast = node("fast", seen_s=61)  # 3 x 10 s + 30 s grace = 60 s
    assert render.stale_nodes([slow, never, huge, fast], NOW) == [never, fast]


def test_metrics_and_commands_tables() -> None:
    metric = MetricRow("web-1", NOW - timedelta(seconds=30), 12.345, 50.0, None, 0.25)
    table = render.metrics_table([metric], NOW)
    assert "12.3" in table
    assert "30s ago" in table
    assert render.metrics_table([], NOW) == "no metrics in this window"
    cmds = render.commands_table([command_row(command_text="echo\x1b[2J a\nb")], NOW, colour=False)
    assert "\\x1b[2J" in cmds  # a control sequence in a command is shown, never executed
    assert "1.5 s" in cmds


def test_command_detail_text_and_json() -> None:
    detail = CommandDetail(
        command=command_row(status="failed", exit_code=2, error=None),
        has_result=True,
        stdout="out \udcff\n",
        stderr="bad thing\n",
        stdout_truncated=True,
        stderr_truncated=False,
        result_created_at=NOW,
    )
    text = render.command_detail_text(detail, NOW, colour=False)
    assert "exit code: 2" in text
    assert "--- stdout (truncated" in text
    assert "out \ufffd" in text
    assert "--- stderr\nbad thing" in text
    doc = render.command_detail_json(detail)
    assert doc["result"]["stdout_truncated"] is True
    assert doc["node_id"] == "web-1"
    pending = CommandDetail(command_row(), False, None, None, False, False, None)  # noqa: FBT003
    assert render.command_detail_json(pending)["result"] is None
    assert "no result yet" in render.command_detail_text(pending, NOW, colour=False)


def make_report(*states: str) -> RunReport:
    report = RunReport("batch", "uptime", "me@here", NOW, NOW + timedelta(minutes=10), 60.0)
    for i, state in enumerate(states):
        report.targets.append(TargetOutcome(f"n{i}", f"c{i}", state))  # type: ignore[arg-type]
    return report


def finished(status: str, exit_code: int | None) -> CommandFinished:
    return CommandFinished(
        command_id="c0",
        node_id="n0",
        status=status,  # type: ignore[arg-type]
        started_at=NOW,
        completed_at=NOW + timedelta(milliseconds=40),
        exit_code=exit_code,
        stdout="hello\n",
        stderr="",
        execution_time_ms=40,
    )


@pytest.mark.parametrize(
    ("states", "code"),
    [
        (("success", "success"), ExitCode.OK),
        (("success", "failed"), ExitCode.FAILED),
        (("success", "timeout", "queued"), ExitCode.FAILED),
        (("success", "no_answer"), ExitCode.FAILED),
        (("success", "queued"), ExitCode.QUEUED),
        (("sent", "sent"), ExitCode.OK),
        (("sent", "queued"), ExitCode.QUEUED),
    ],
)
def test_run_exit_codes(states: tuple[str, ...], code: ExitCode) -> None:
    assert make_report(*states).exit_code() == code


def test_progress_line_and_summary() -> None:
    report = make_report("success", "failed", "waiting", "running", "queued")
    assert render.progress_line(report) == "2/4 done: 1 ok, 1 failed, 2 waiting, 1 queued"
    report.give_up()
    assert report.targets[2].state == "no_answer"
    assert render.run_summary(report) == "5 targets: 1 ok, 1 failed, 2 no answer, 1 queued"


def test_target_block_shows_status_exit_code_duration_and_output() -> None:
    report = make_report("waiting")
    target = report.targets[0]
    target.mark_started(NOW)
    assert target.state == "running"
    target.record(finished("failed", 3))
    block = render.target_block(target, colour=False)
    assert block.splitlines()[0] == "n0 | failed | exit 3 | 40 ms | c0"
    assert "--- stdout\nhello" in block
    target.mark_started(NOW)  # a late "running" never undoes a final result
    assert target.state == "failed"


def test_run_json_document() -> None:
    report = make_report("waiting", "queued")
    report.targets[0].record(finished("success", 0))
    doc = json.loads(render.dumps(render.run_json(report)))
    assert doc["exit_code"] == 4
    assert doc["summary"] == {
        "targets": 2, "success": 1, "failed": 0, "timeout": 0, "no_answer": 0, "queued": 1,
        "sent": 0,
    }  # fmt: skip
    first = doc["results"][0]
    assert first["status"] == "success"
    assert first["completed_at"] == "2026-11-30T12:00:00.040000Z"
    assert doc["results"][1]["status"] == "queued"
    assert doc["expires_at"] == "2026-11-30T12:10:00Z"


def test_node_supplied_text_is_shown_escaped_never_executed() -> None:
    # hostname, address, os, agent version and reason come from the node: an agent (or a
    # forged status) must not be able to drive the operator's terminal.
    evil = msgspec.structs.replace(
        node("web-1", status="error"),
        hostname="h\x1b[2Jx",
        ip_address="10.0.0.1\x07",
        agent_version="1.0\x1b]0;pwned\x07",
        status_reason="disk\rfull",
        os_info="Linux\x1b[31m",
    )
    table = render.nodes_table([evil], NOW, colour=False)
    detail = render.node_detail_text(
        NodeDetail(node=evil, latest_metric=None, recent_metric_count=0),
        NOW,
        colour=False,
        window="1h",
    )
    for text in (table, detail):
        assert "\x1b" not in text
        assert "\x07" not in text
        assert "\r" not in text
        assert "h\\x1b[2Jx" in text
    assert "Linux\\x1b[31m" in detail
