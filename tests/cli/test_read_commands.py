from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import click
import pytest
from click.testing import Result
from sqlmodel import Session

from mqfleet.cli import cli
from mqfleet.cli.app import LAZY_COMMANDS
from mqfleet.store.engine import create_store_engine
from mqfleet.store.models import Command, CommandResult
from mqfleet.store.queries import get_node, list_metrics, list_nodes
from mqfleet.store.reader import open_reader

if TYPE_CHECKING:
    from pathlib import Path

Invoke = Callable[..., Result]


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mqfleet: error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.integration
def test_nodes_show_metrics_json_match_the_database(
    migrated_url: str, invoke: Invoke, seed: Callable[..., None]
) -> None:
    seed(migrated_url, "web-1", metrics=5)
    seed(migrated_url, "db-1", status="offline")
    db = ("--database", migrated_url)

    nodes = invoke(*db, "nodes", "--json")
    assert nodes.exit_code == 0, nodes.stderr
    doc = json.loads(nodes.stdout)
    with open_reader(migrated_url) as reader:
        stored = list_nodes(reader)
        detail = get_node(reader, "web-1", metrics_since=stored[0].registered_at.replace(year=2000))
        samples = list_metrics(reader, "web-1", limit=3)
    assert [n["node_id"] for n in doc["nodes"]] == [n.node_id for n in stored]
    web = doc["nodes"][1]
    assert web["status"] == "online"
    assert web["hostname"] == "web-1.example"
    assert web["session"] == 7
    assert web["last_heartbeat"] == stored[1].last_heartbeat.isoformat().replace("+00:00", "Z")

    online = json.loads(invoke(*db, "nodes", "--status", "offline", "--json").stdout)
    assert [n["node_id"] for n in online["nodes"]] == ["db-1"]

    show = invoke(*db, "show", "web-1", "--json")
    assert show.exit_code == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["node"] == web
    assert detail.latest_metric is not None
    assert shown["latest_metric"]["cpu_usage"] == detail.latest_metric.cpu_usage == 0.0
    assert shown["latest_metric"]["disk_usage"] == 70.25
    assert shown["metrics_in_window"] == 5
    assert shown["commands"] == {}

    metrics = invoke(*db, "metrics", "web-1", "--limit", "3", "--json")
    assert metrics.exit_code == 0, metrics.stderr
    rows = json.loads(metrics.stdout)["metrics"]
    assert [r["cpu_usage"] for r in rows] == [m.cpu_usage for m in samples] == [0.0, 1.0, 2.0]
    assert rows[0]["metric_time"] == samples[0].metric_time.isoformat().replace("+00:00", "Z")
    recent = json.loads(invoke(*db, "metrics", "web-1", "--since", "90s", "--json").stdout)
    assert len(recent["metrics"]) == 2


@pytest.mark.integration
def test_tables_are_plain_when_not_on_a_terminal(
    sqlite_url: str, invoke: Invoke, seed: Callable[..., None]
) -> None:
    invoke("--database", sqlite_url, "db", "upgrade")
    seed(sqlite_url, "web-1", metrics=2)
    out = invoke("--database", sqlite_url, "nodes")
    assert out.exit_code == 0
    assert out.stdout.splitlines()[0].startswith("NODE")
    assert "web-1" in out.stdout
    assert "s ago" in out.stdout
    assert "\x1b[" not in out.stdout
    assert "online" in invoke("--database", sqlite_url, "show", "web-1").stdout
    assert "CPU%" in invoke("--database", sqlite_url, "metrics", "web-1").stdout


@pytest.mark.integration
def test_commands_and_result(migrated_url: str, invoke: Invoke, seed: Callable[..., None]) -> None:
    seed(migrated_url, "web-1")
    engine = create_store_engine(migrated_url)
    try:
        with Session(engine) as session:
            session.add(Command(command_id="c-1", command_text="false", target_node_id="web-1",
                                status="failed", batch_id="b"))  # fmt: skip
            session.commit()
            session.add(CommandResult(command_id="c-1", stdout="", stderr="nope\n", exit_code=1,
                                      execution_time_ms=3))  # fmt: skip
            session.commit()
    finally:
        engine.dispose()
    db = ("--database", migrated_url)
    listed = json.loads(invoke(*db, "commands", "--node", "web-1", "--json").stdout)
    assert [(c["command_id"], c["status"], c["exit_code"]) for c in listed["commands"]] == [
        ("c-1", "failed", 1)
    ]
    assert json.loads(invoke(*db, "commands", "--status", "success", "--json").stdout) == {
        "commands": []
    }
    full = json.loads(invoke(*db, "result", "c-1", "--json").stdout)
    assert full["result"]["stderr"] == "nope\n"
    text = invoke(*db, "result", "c-1")
    assert "nope" in text.stdout
    unknown = invoke(*db, "result", "c-404")
    assert unknown.exit_code == 2
    assert one_error_line(unknown) == "mqfleet: error: unknown command: c-404"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("show", "ghost"), 2, "unknown node: ghost"),
        (("metrics", "ghost"), 2, "unknown node: ghost"),
        (("show", "bad/id"), 2, "invalid node id"),
        (("metrics", "web-1", "--since", "5x"), 2, "invalid duration '5x'"),
        (("metrics", "web-1", "--limit", "0"), 2, "--limit"),
        (("nodes", "--status", "sleepy"), 2, "--status"),
        (("nodes", "--bogus"), 2, "No such option '--bogus' (see 'mqfleet nodes --help')"),
        (("frobnicate",), 2, "No such command"),
        (("--broker", "http://x", "nodes"), 2, "broker URL must start with mqtt://"),
        (("--database", "oracle://x/y", "nodes"), 2, "unsupported database"),
    ],
)
def test_bad_input_gives_one_line_and_the_exit_code(  # noqa: PLR0917 - pytest fixtures
    sqlite_url: str,
    invoke: Invoke,
    seed: Callable[..., None],
    args: tuple[str, ...],
    code: int,
    fragment: str,
) -> None:
    invoke("--database", sqlite_url, "db", "upgrade")
    seed(sqlite_url, "web-1")
    result = invoke("--database", sqlite_url, *args)
    assert result.exit_code == code
    assert fragment in one_error_line(result)
    assert result.stdout == ""


@pytest.mark.integration
def test_unreachable_or_missing_database_is_exit_3(invoke: Invoke, tmp_path: Path) -> None:
    down = invoke("--database", "postgresql://nobody@127.0.0.1:1/x", "nodes")
    assert down.exit_code == 3
    assert "cannot read database" in one_error_line(down)
    missing = invoke("--database", f"sqlite:///{tmp_path / 'none.db'}", "nodes")
    assert missing.exit_code == 3
    assert "does not exist yet" in one_error_line(missing)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.integration
def test_stale_online_nodes_warn_that_the_collector_is_not_recording(
    sqlite_url: str, invoke: Invoke
) -> None:
    invoke("--database", sqlite_url, "db", "upgrade")
    engine = create_store_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO nodes (node_id, hostname, ip_address, status, last_heartbeat,"
                " interval_s) VALUES ('old', 'h', '1.2.3.4', 'online', '2020-01-01 00:00:00', 10)"
            )
    finally:
        engine.dispose()
    result = invoke("--database", sqlite_url, "nodes", "--json")
    assert result.exit_code == 0
    assert "is 'mqfleet collector' running?" in result.stderr
    assert json.loads(result.stdout)["nodes"][0]["node_id"] == "old"


def test_db_upgrade_creates_the_schema(invoke: Invoke, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'fleet.db'}"
    first = invoke("--database", url, "db", "upgrade")
    assert first.exit_code == 0, first.stderr
    assert "up to date" in first.stdout
    assert invoke("--database", url, "nodes", "--json").stdout.strip() == '{\n  "nodes": []\n}'


def test_version_and_help(invoke: Invoke) -> None:
    assert invoke("--version").stdout.startswith("mqfleet, version ")
    helped = invoke("--help")
    assert helped.exit_code == 0
    for name in ("agent", "collector", "nodes", "show", "metrics", "run", "commands", "result",
                 "up", "db", "keys", "provision", "revoke", "simulate"):  # fmt: skip
        assert name in helped.stdout


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_lazy_commands_are_found_by_name(invoke: Invoke, name: str) -> None:
    # Their modules are imported on first use: each name must lead to its command.
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    assert command.name == name
    assert command.callback is not None
    assert command.callback.__module__ == LAZY_COMMANDS[name]
    helped = invoke(name, "--help")
    assert helped.exit_code == 0, helped.stderr
    assert helped.stdout.startswith(f"Usage: mqfleet {name} ")
