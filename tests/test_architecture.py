"""The import rules of docs/ARCHITECTURE.md, checked by parsing every module with ``ast``."""

from __future__ import annotations

import ast
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mqfleet"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

#: Which mqfleet components each component may import (docs/ARCHITECTURE.md, "may import").
#: ``mqfleet`` itself (the package root: version and errors) is always allowed.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "protocol": {"errors"},
    "settings": {"protocol", "errors"},
    "transport": {"settings", "errors"},
    "localbroker": {"errors"},
    "loops": {"errors"},
    # Process plumbing of both entry points (exit codes, logging, signals): no click.
    "runtime": {"settings", "errors"},
    "store": {"protocol", "errors"},
    # Self-contained building blocks (tokens, ACL, signatures) that each side picks from.
    "security": {"protocol", "settings", "errors"},
    "agent": {"protocol", "settings", "transport", "errors", "security", "loops", "runtime"},
    # The fleet simulator (bench/) speaks the protocol like many agents at once.
    "simulator": {"protocol", "settings", "transport", "errors", "localbroker", "loops"},
    "collector": {"protocol", "settings", "transport", "store", "errors", "security", "loops"},
    "cli": {
        "protocol",
        "settings",
        "transport",
        "store",
        "errors",
        "localbroker",
        "security",
        "loops",
        "runtime",
        "agent",
        "collector",
        "simulator",
    },
}
#: Third-party packages a component must never import, even lazily.
NEVER_IMPORTS: dict[str, set[str]] = {
    # The agent runs on small edge devices: no database layer at all.
    "agent": {"sqlalchemy", "sqlmodel", "alembic", "psycopg"},
    "simulator": {"sqlalchemy", "sqlmodel", "alembic", "psycopg"},
    "protocol": {"sqlalchemy", "sqlmodel", "aiomqtt", "paho", "click", "psutil"},
    # Every process imports settings first: pydantic would cost the CLI and the agent
    # ~90 ms of start-up and megabytes of RSS (issue 5). msgspec does the conversions.
    "settings": {"pydantic", "pydantic_core", "pydantic_settings", "sqlalchemy", "sqlmodel"},
    # Nothing in security talks to the network or the database (its docstring's promise).
    "security": {"sqlalchemy", "sqlmodel", "alembic", "psycopg", "aiomqtt", "paho"},
}
#: Modules of the CLI's read path (issue 5: `mqfleet nodes` in 300 ms, `run` in 250 ms):
#: they talk to sqlite3/psycopg directly, as ``import sqlalchemy`` alone costs ~150 ms.
READ_PATH = ("mqfleet.store.queries", "mqfleet.store.reader", "mqfleet.store.urls")
READ_PATH_NEVER_IMPORTS = {"sqlalchemy", "sqlmodel", "alembic"}
#: What the read commands never load (issue 5: `mqfleet nodes` of 10,000 nodes and
#: `metrics` in 300 ms, start-up included): the modules of the other commands (imported on
#: first use through LAZY_COMMANDS), logging (configured only with -v), asyncio, the
#: stdlib json (msgspec writes --json) and, on SQLite, psycopg.
READ_COMMANDS_NEVER_LOAD = (
    *sorted(READ_PATH_NEVER_IMPORTS),
    "mqfleet.cli.accounts",
    "mqfleet.cli.run",
    "mqfleet.cli.simulate",
    "mqfleet.cli.up",
    "mqfleet.localbroker",
    "mqfleet.agent",
    "mqfleet.collector",
    "logging",
    "traceback",
    "asyncio",
    "json",
    "psycopg",
)
#: The only third-party packages the wire protocol may use.
PROTOCOL_THIRD_PARTY = {"msgspec"}
#: Components the CLI may import only inside functions (keeps start-up lean, and
#: ``mqfleet nodes`` on a server never loads the agent).
CLI_LAZY_ONLY = {"agent", "collector", "simulator"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. mqfleet.agent.service
    target: str  # dotted name imported, e.g. mqfleet.store.models
    line: int
    lazy: bool  # inside a function or an ``if TYPE_CHECKING:`` block

    def __str__(self) -> str:
        path = self.importer.replace(".", "/")
        return f"src/{path}.py:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, *, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self._lazy_depth = 0

    def _lazy(self, node: ast.AST) -> None:
        self._lazy_depth += 1
        self.generic_visit(node)
        self._lazy_depth -= 1

    visit_FunctionDef = _lazy  # noqa: N815 - ast.NodeVisitor's naming
    visit_AsyncFunctionDef = _lazy  # noqa: N815
    visit_Lambda = _lazy  # noqa: N815

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        is_type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if is_type_checking:
            self._lazy_depth += 1
            for child in node.body:
                self.visit(child)
            self._lazy_depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, target: str, node: ast.stmt) -> None:
        self.imports.append(Import(self.module, target, node.lineno, self._lazy_depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base)
            target = f"{prefix}.{node.module}" if node.module else prefix
        else:
            target = node.module or ""
        if target == "mqfleet" or (node.level and not node.module):
            # "from mqfleet import errors" or "from . import topics": the names are modules.
            for alias in node.names:
                self._add(f"{target}.{alias.name}", node)
        else:
            self._add(target, node)


def all_imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:
            continue  # Alembic's env and revisions belong to store and import only it
        collector = ImportCollector(module_name(path), is_package=path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(collector.imports)
    return found


def component(module: str) -> str | None:
    """``mqfleet.agent.service`` -> ``agent``; ``mqfleet`` and ``mqfleet.__main__`` -> None."""
    parts = module.split(".")
    if parts[0] != "mqfleet" or len(parts) < 2 or parts[1].startswith("__"):
        return None
    return parts[1]


IMPORTS = all_imports()


def test_the_collector_sees_the_codebase() -> None:
    importers = {component(i.importer) for i in IMPORTS}
    assert {"protocol", "settings", "transport", "store", "localbroker"} <= importers
    # Relative imports are resolved too.
    collector = ImportCollector("mqfleet.protocol.codec", is_package=False)
    collector.visit(ast.parse("from .payloads import X\nfrom . import topics\n"))
    assert [i.target for i in collector.imports] == [
        "mqfleet.protocol.payloads",
        "mqfleet.protocol.topics",
    ]


def test_the_rules_cover_every_component() -> None:
    components = {component(module_name(p)) for p in SRC.rglob("*.py")} - {None}
    # "broker" is the shipped config (a data directory), not code.
    assert components - {"broker"} <= set(MAY_IMPORT), "add the new component to MAY_IMPORT"


@pytest.mark.parametrize("owner", sorted(MAY_IMPORT))
def test_components_import_only_what_the_architecture_allows(owner: str) -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if component(i.importer) == owner
        and (target := component(i.target)) is not None
        and target != owner
        and target not in MAY_IMPORT[owner]
    ]
    assert bad == [], f"{owner} may import only {sorted(MAY_IMPORT[owner])}"


@pytest.mark.parametrize("owner", sorted(NEVER_IMPORTS))
def test_forbidden_third_party_imports(owner: str) -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if component(i.importer) == owner and i.target.split(".")[0] in NEVER_IMPORTS[owner]
    ]
    assert bad == []


def test_the_read_path_never_imports_sqlalchemy() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if i.importer in READ_PATH
        and (
            i.target.split(".")[0] in READ_PATH_NEVER_IMPORTS
            or (i.target.startswith("mqfleet.store.") and i.target not in READ_PATH)
        )
    ]
    assert bad == []


def _read_database(path: Path) -> str:
    """A SQLite database with the columns the read commands select: a node, a sample now."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE nodes (node_id, hostname, ip_address, os_info, status,"
                     " status_reason, last_heartbeat, registered_at, updated_at, session,"
                     " interval_s, agent_version)")  # fmt: skip
        conn.execute("INSERT INTO nodes VALUES ('web-1', 'h', '10.0.0.1', NULL, 'online',"
                     " NULL, '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00',"
                     " '2026-01-01 00:00:00', 1, 10.0, '0.1')")  # fmt: skip
        conn.execute("CREATE TABLE node_metrics (node_id, metric_time, cpu_usage,"
                     " memory_usage, disk_usage, load_average)")  # fmt: skip
        conn.execute("INSERT INTO node_metrics VALUES ('web-1', ?, 1.5, 2.5, 3.5, 0.25)", [now])
        conn.execute("CREATE TABLE commands (target_node_id, status)")
    conn.close()
    return f"sqlite:///{path}"


def _run_read_code(tmp_path: Path, code: str) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter without the developer's config; (stdout, loaded).

    ``code`` ends by printing ``loaded: <modules it must not have loaded>``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQFLEET_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stdout.splitlines()[-1]


def _cli_code(url: str, args: list[str], never: list[str]) -> str:
    return (
        "import sys\n"
        "from mqfleet.cli import main\n"
        f"sys.argv = ['mqfleet', '--database', {url!r}, *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"bad = [m for m in {never!r} if m in sys.modules]\n"
        "print('loaded:', ','.join(bad))\n"
    )


def test_the_read_commands_never_load_sqlalchemy(tmp_path: Path) -> None:
    # Transitive imports count: run `mqfleet nodes` and `run`'s target lookup for real,
    # on a SQLite database with a node, in a fresh interpreter.
    url = _read_database(tmp_path / "fleet.db")
    lookup = (
        "from mqfleet.cli.run import _resolve_targets\n"
        "from mqfleet.settings import load_settings\n"
        f"settings = load_settings(database_url={url!r})\n"
        "targets = _resolve_targets(settings, [], all_nodes=False, pattern='web-*')\n"
        "assert [t.node_id for t in targets] == ['web-1'], targets\n"
    )
    code = _cli_code(url, ["nodes", "--json"], sorted(READ_PATH_NEVER_IMPORTS))
    head, _, tail = code.rpartition("bad = ")
    stdout, loaded = _run_read_code(tmp_path, head + lookup + "bad = " + tail)
    assert '"node_id": "web-1"' in stdout
    assert loaded == "loaded: ", f"the read commands {loaded}"


@pytest.mark.parametrize(
    "args",
    [["nodes"], ["nodes", "--json"], ["metrics", "web-1", "--since", "1h"],
     ["metrics", "web-1", "--json"], ["show", "web-1"]],
    ids=" ".join,
)  # fmt: skip
def test_the_read_commands_load_only_what_they_use(tmp_path: Path, args: list[str]) -> None:
    # Each command shows the node or its sample (cpu 1.5), so it read the database.
    # Transitive imports count: the whole command, in a fresh interpreter.
    url = _read_database(tmp_path / "fleet.db")
    code = _cli_code(url, args, list(READ_COMMANDS_NEVER_LOAD))
    stdout, loaded = _run_read_code(tmp_path, code)
    assert "web-1" in stdout or "1.5" in stdout, stdout
    assert loaded == "loaded: ", f"mqfleet {' '.join(args)} {loaded}"


def test_protocol_depends_only_on_msgspec_and_the_stdlib() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if component(i.importer) == "protocol"
        and (root := i.target.split(".")[0]) not in STDLIB
        and root not in PROTOCOL_THIRD_PARTY
        and component(i.target) not in {"protocol", "errors"}
    ]
    assert bad == []


def test_errors_imports_nothing_but_the_stdlib() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if component(i.importer) == "errors" and i.target.split(".")[0] not in STDLIB
    ]
    assert bad == []


def test_agent_and_collector_never_import_each_other_or_the_cli() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if (owner := component(i.importer)) in {"agent", "collector"}
        and component(i.target) in ({"agent", "collector", "cli"} - {owner})
    ]
    assert bad == []


def test_cli_imports_agent_and_collector_only_inside_functions() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if component(i.importer) == "cli" and component(i.target) in CLI_LAZY_ONLY and not i.lazy
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("mqfleet.agent", ["sqlalchemy", "sqlmodel", "alembic", "mqfleet.store"]),
        ("mqfleet.protocol", ["sqlalchemy", "aiomqtt", "paho", "click", "psutil"]),
        ("mqfleet", ["sqlalchemy", "pydantic", "aiomqtt"]),
        (
            "mqfleet.settings",
            ["pydantic", "pydantic_settings", "sqlalchemy", "aiomqtt", "paho", "click"],
        ),
        ("mqfleet.store.queries", ["sqlalchemy", "sqlmodel", "psycopg"]),
    ],
)
def test_runtime_import_footprint(module: str, forbidden: list[str]) -> None:
    # Transitive imports count too: a helper that pulls in SQLAlchemy would break the
    # agent's promise even though no agent file names it.
    loaded = loaded_by(f"import {module}", forbidden)
    assert loaded == [], f"importing {module} loads {','.join(loaded)}"


def loaded_by(code: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` running ``code`` in a fresh interpreter leaves imported."""
    check = f"import sys\nprint(','.join(m for m in {modules!r} if m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{check}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


#: Importing pydantic and building models costs the agent and every CLI command ~40 ms
#: and ~10 MiB RSS (issue 5); the wire protocol and the agent's own state do without it.
PYDANTIC = ["pydantic", "pydantic_core"]
#: Imports ``mqfleet.agent.journal`` alone: ``mqfleet/agent/__init__.py`` imports the
#: whole agent (settings included), which test_the_agent_does_not_load_pydantic covers.
JOURNAL_ALONE = (
    "import sys, types, pathlib, mqfleet\n"
    "agent = types.ModuleType('mqfleet.agent')\n"
    "agent.__path__ = [str(pathlib.Path(mqfleet.__file__).parent / 'agent')]\n"
    "sys.modules['mqfleet.agent'] = agent\n"
    "import mqfleet.agent.journal\n"
)


@pytest.mark.parametrize(
    ("code", "module"),
    [
        ("import mqfleet.protocol", "mqfleet.protocol"),
        (JOURNAL_ALONE, "mqfleet.agent.journal"),
    ],
    ids=["protocol", "agent.journal"],
)
def test_the_protocol_and_the_journal_do_not_load_pydantic(code: str, module: str) -> None:
    # The module itself, neither the rest of the agent nor pydantic.
    assert loaded_by(code, [module, "mqfleet.agent.service", *PYDANTIC]) == [module]


def test_the_agent_does_not_load_pydantic() -> None:
    # msgspec carries the protocol and the settings: pydantic (SQLModel's) is for the
    # collector and the store only, and would cost the agent ~10 MiB (issue 5).
    loaded = loaded_by("import mqfleet.agent", PYDANTIC)
    assert loaded == [], f"importing mqfleet.agent loads {','.join(loaded)}"


def test_the_agent_verifies_commands_without_loading_cryptography(tmp_path: Path) -> None:
    # cryptography's wheel brings its own OpenSSL (~7 MiB RSS, issue 5): the agent checks
    # signatures on the libcrypto its ssl module already mapped (mqfleet.security.ed25519).
    from mqfleet.protocol import CommandRequest, encode, utc_now  # noqa: PLC0415
    from mqfleet.security.signing import (  # noqa: PLC0415
        load_private_key,
        save_key_pair,
        sign_command,
    )

    save_key_pair(tmp_path / "op.key", tmp_path / "op.pub")
    now = utc_now()
    request = CommandRequest(
        command_id="3f1c2a8e-1111-4222-8333-444455556666", node_id="web-1",
        command_text="true", timeout_s=5, created_at=now,
        expires_at=now + timedelta(minutes=5), issuer="t",
    )  # fmt: skip
    signed = sign_command(request, load_private_key(tmp_path / "op.key"))
    (tmp_path / "cmd.json").write_bytes(encode(signed))
    code = (
        "import pathlib, mqfleet.agent, mqfleet.security\n"
        "from mqfleet.protocol import decode_command\n"
        "from mqfleet.security.verify import CommandVerifier\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "v = CommandVerifier.from_files(node_id='web-1', public_key_files=[d / 'op.pub'])\n"
        "v.check(decode_command((d / 'cmd.json').read_bytes()))\n"
    )
    assert loaded_by(code, ["cryptography", "_cffi_backend"]) == []


def test_the_agents_own_entry_point_never_loads_click_or_the_cli() -> None:
    # mqfleet-agent is what nodes run: the operator CLI would cost every node ~1 MiB.
    code = "import mqfleet.agent.__main__ as entry\nentry.build_parser().parse_args([])\n"
    assert loaded_by(code, ["click", "mqfleet.cli", "mqfleet.cli.app"]) == []


def test_runtime_never_loads_click() -> None:
    assert loaded_by("import mqfleet.runtime", ["click", "mqfleet.cli"]) == []


def test_the_agent_never_loads_the_broker_account_tooling() -> None:
    # mqfleet.security loads each name on first use: the agent takes the verifier only.
    unneeded = ["mqfleet.security.passwords", "mqfleet.security.acl", "mqfleet.security.signing"]
    assert loaded_by("import mqfleet.agent.__main__, mqfleet.agent", unneeded) == []


def test_lazy_imports_are_told_apart() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import mqfleet.settings\n"
        "if TYPE_CHECKING:\n"
        "    from mqfleet.store import models\n"
        "def run():\n"
        "    from mqfleet.agent import run_agent\n"
    )
    collector = ImportCollector("mqfleet.cli.main", is_package=False)
    collector.visit(ast.parse(source))
    lazy = {i.target: i.lazy for i in collector.imports}
    assert lazy == {
        "typing": False,
        "mqfleet.settings": False,
        "mqfleet.store": True,
        "mqfleet.agent": True,
    }


def _builds_an_aiomqtt_client(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "Client"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "aiomqtt"
    )


def test_only_the_transport_builds_aiomqtt_clients() -> None:
    """Everything else gets :class:`mqfleet.transport.MqttClient` (cancel-safe waits)."""
    bad = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        if path != SRC / "transport.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if _builds_an_aiomqtt_client(node) and isinstance(node, ast.Call)
    ]
    assert bad == []
