"""What every benchmark needs: a private broker, a temp database, real processes, a table.

Each benchmark starts its own :class:`LocalBroker` on a free port and its own database
(an SQLite file in a temp dir, or a temp schema in PostgreSQL's ``test`` database) and
runs the real ``mqfleet`` processes against them. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from mqfleet.localbroker import LocalBroker
from mqfleet.store.engine import create_store_engine, upgrade

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MQFLEET = str(Path(PYTHON).with_name("mqfleet"))
MQFLEET_AGENT = str(Path(PYTHON).with_name("mqfleet-agent"))
POSTGRES_URL = os.environ.get(
    "MQFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """Yield a temp directory, removed afterwards (kept with BENCH_KEEP=1 for post-mortems)."""
    path = Path(tempfile.mkdtemp(prefix=f"mqfleet-bench-{name}-"))
    try:
        yield path
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def broker(work: Path, extra_config: str = "") -> Iterator[LocalBroker]:
    """Run a private mosquitto with the project config on a free loopback port.

    Authentication is off (``auth=False``): a loopback benchmark measures throughput,
    and password checks happen once per connection, not per message.
    """
    b = LocalBroker(data_dir=work / "mosquitto", extra_config=extra_config, auth=False)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@contextlib.contextmanager
def database(kind: str, work: Path) -> Iterator[str]:
    """URL of a fresh database migrated to head: ``sqlite`` file or ``postgres`` schema."""
    if kind == "sqlite":
        url = f"sqlite:///{work / 'fleet.db'}"
        engine = create_store_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = (
        sa.make_url(POSTGRES_URL)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        engine = create_store_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_available() -> bool:
    """Say whether the benchmark PostgreSQL answers."""
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def scalar(url: str, sql: str, **params: object) -> object:
    """Run one query on ``url`` and return its single value."""
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def mqfleet_argv(broker_url: str, database_url: str | None, *args: str) -> list[str]:
    """Build the argv of an ``mqfleet`` command against this benchmark's broker and database."""
    argv = [MQFLEET, "--broker", broker_url]
    if database_url is not None:
        argv += ["--database", database_url]
    return [*argv, *args]


def bench_env() -> dict[str, str]:
    """Return the environment of child processes: no developer config, no MQFLEET_* leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQFLEET_")}
    # No config file of the developer's can change what is measured.
    env["XDG_CONFIG_HOME"] = str(Path(tempfile.gettempdir()) / "mqfleet-bench-no-config")
    return env


def operator_keys(work: Path) -> dict[str, str]:
    """Create an operator key pair; return the environment that signs and verifies with it."""
    key = work / "operator.key"
    subprocess.run(
        [MQFLEET, "keys", "init", "--private-key", str(key)],
        check=True,
        capture_output=True,
        env=bench_env(),
    )
    return {
        "MQFLEET_OPERATOR_PRIVATE_KEY_FILE": str(key),
        "MQFLEET_OPERATOR_PUBLIC_KEY_FILE": str(key.with_suffix(".pub")),
    }


@dataclass
class Service:
    """A long-running child process (collector, agent, simulator), stopped with SIGTERM."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        """Return the last lines of the service's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start(
    name: str, argv: list[str], work: Path, env: dict[str, str] | None = None, **kwargs: object
) -> Service:
    """Start ``argv`` in its own session with its output in ``work/<name>.log``."""
    log_path = work / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=kwargs.pop("stdin", subprocess.DEVNULL),  # type: ignore[arg-type]
            stdout=kwargs.pop("stdout", log),  # type: ignore[arg-type]
            stderr=log,
            start_new_session=True,
            env={**bench_env(), **(env or {})},
            **kwargs,  # type: ignore[arg-type]
        )
    return Service(name, proc, log_path)


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> float:
    """Poll ``condition`` until true; return the time it took; raise on timeout."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - t0


def percentile(values: list[float], pct: float) -> float:
    """Return the ``pct`` percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    """Return the median of ``values``."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    figure: float
    unit: str
    baseline_name: str
    baseline: float
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """The figure divided by its baseline of the same run."""
        return self.figure / self.baseline if self.baseline else float("nan")


@dataclass
class Table:
    """The results of a run, printed at the end."""

    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        """Record a result and print it at once (long runs show progress)."""
        self.rows.append(row)
        print(f"  -> {fmt_row(row)}", flush=True)

    def render(self) -> str:
        """Render every result as a Markdown table."""
        out = [
            "| benchmark | figure | baseline (same run) | ratio | target | met |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            met = "" if r.met is None else ("yes" if r.met else "**no**")
            note = f" ({r.note})" if r.note else ""
            out.append(
                f"| {r.benchmark}{note} | {_num(r.figure)} {r.unit} | {r.baseline_name}: "
                f"{_num(r.baseline)} {r.unit} | {_ratio(r)} | {r.target} | {met} |"
            )
        return "\n".join(out)


def _ratio(row: Row) -> str:
    # No ratio against a zero baseline (an idle process that used no CPU tick).
    return "n/a" if math.isnan(row.ratio) else f"{row.ratio:.2f}"


def _num(value: float) -> str:
    if value != value:  # NaN  # noqa: PLR0124 - NaN check without math
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_row(r: Row) -> str:
    """One result as a line of text."""
    met = "" if r.met is None else (" [met]" if r.met else " [MISSED]")
    return (
        f"{r.benchmark}: {_num(r.figure)} {r.unit} vs {r.baseline_name} {_num(r.baseline)} "
        f"{r.unit} (ratio {_ratio(r)}; target {r.target or '-'}){met}"
    )
