"""The public names of mqfleet: adding one is a decision, removing one is a breaking change."""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

import mqfleet
import mqfleet.protocol

ROOT = Path(__file__).resolve().parents[1]

PACKAGE_API = {
    "AgentStateError",
    "AuthenticationError",
    "BrokerError",
    "CommandRefusedError",
    "ConfigError",
    "MqfleetError",
    "ProtocolError",
    "StoreError",
    "UnknownCommandError",
    "UnknownNodeError",
    "__version__",
}

PROTOCOL_API = {
    "COMMAND_TERMINAL_STATUSES",
    "ERROR_AGENT_RESTARTED",
    "ERROR_EXPIRED_BEFORE_DELIVERY",
    "ERROR_EXPIRED_BEFORE_START",
    "ERROR_NOT_DELIVERED",
    "REASON_CONNECTION_LOST",
    "REASON_HEARTBEAT_TIMEOUT",
    "REASON_SHUTDOWN",
    "DEFAULT_PREFIX",
    "MAX_PAYLOAD_BYTES",
    "NODE_ID_PATTERN",
    "PROTOCOL_VERSION",
    "CollectorStatus",
    "CommandFinished",
    "CommandRequest",
    "CommandResultReport",
    "CommandStarted",
    "CommandStatus",
    "MetricsReport",
    "NodeStatus",
    "ParsedTopic",
    "StatusReport",
    "TopicKind",
    "Topics",
    "decode_collector_status",
    "decode_command",
    "decode_metrics",
    "decode_result",
    "decode_status",
    "encode",
    "truncate_for_log",
    "utc_now",
    "validate_node_id",
}


def test_package_all() -> None:
    assert set(mqfleet.__all__) == PACKAGE_API
    assert len(mqfleet.__all__) == len(set(mqfleet.__all__))


def test_protocol_all() -> None:
    assert set(mqfleet.protocol.__all__) == PROTOCOL_API
    assert len(mqfleet.protocol.__all__) == len(set(mqfleet.protocol.__all__))


def test_version_matches_the_distribution() -> None:
    assert mqfleet.__version__ == version("mqfleet")


def test_every_error_is_an_mqfleet_error() -> None:
    for name in PACKAGE_API - {"__version__"}:
        assert issubclass(getattr(mqfleet, name), mqfleet.MqfleetError)
    assert issubclass(mqfleet.AuthenticationError, mqfleet.BrokerError)


@pytest.mark.parametrize(
    "module",
    [
        "mqfleet",
        "mqfleet.errors",
        "mqfleet.protocol",
        "mqfleet.protocol.topics",
        "mqfleet.protocol.payloads",
        "mqfleet.protocol.codec",
        "mqfleet.settings",
        "mqfleet.transport",
        "mqfleet.localbroker",
        "mqfleet.runtime",
        "mqfleet.security",
        "mqfleet.security.ed25519",
        "mqfleet.security.verify",
        "mqfleet.security.signing",
    ],
)
def test_all_names_exist_and_are_documented(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__, f"{module} has no module docstring"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists missing {name}"
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_protocol_reexports_its_submodules() -> None:
    for sub in ("topics", "payloads", "codec"):
        mod = importlib.import_module(f"mqfleet.protocol.{sub}")
        assert set(mod.__all__) <= PROTOCOL_API, f"protocol.{sub} exports names the package hides"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = "./scripts/install --dev && ./scripts/test"
    assert command in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{command} || status=$?\n" in ci


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []


def test_the_lazy_security_package_knows_where_every_name_lives() -> None:
    from mqfleet import security  # noqa: PLC0415

    assert set(security._HOMES) == set(security.__all__)
    for name, home in security._HOMES.items():
        assert getattr(importlib.import_module(home), name) is getattr(security, name)
