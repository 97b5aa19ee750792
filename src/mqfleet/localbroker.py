"""Run a private Mosquitto with the project's ``broker/`` config on a loopback port.

Used by ``mqfleet up`` (the newcomer's local fleet), the test suite and the benchmarks.
Only the listener, persistence directory and pid file of the shipped config are
rewritten; every other line (limits, TCP_NODELAY, persistence) is the production one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Self

from mqfleet.errors import BrokerError

__all__ = [
    "MOSQUITTO_INSTALL_HINT",
    "LocalBroker",
    "find_broker_config",
    "free_port",
    "raise_nofile_limit",
    "render_local_config",
]

log = logging.getLogger(__name__)

MOSQUITTO_INSTALL_HINT: Final = (
    "mosquitto not found on PATH: install it with "
    "'sudo apt-get install -y mosquitto' (Debian/Ubuntu) and run again"
)
_CONFIG_NAME: Final = "mosquitto.conf"


def find_broker_config() -> Path:
    """Return the shipped ``broker/mosquitto.conf`` (``$MQFLEET_BROKER_CONF`` overrides)."""
    env = os.environ.get("MQFLEET_BROKER_CONF")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    # Installed: a copy inside the package; source checkout: the repo's broker/.
    candidates += [here / "broker" / _CONFIG_NAME, here.parents[1] / "broker" / _CONFIG_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise BrokerError("cannot find broker/mosquitto.conf; set MQFLEET_BROKER_CONF to its path")


def render_local_config(
    template: str, *, port: int, data_dir: Path, host: str = "127.0.0.1"
) -> str:
    """Rewrite the shipped config for a private broker on ``host:port`` in ``data_dir``."""
    replacements = {
        "listener": f"listener {port} {host}",
        "persistence_location": f"persistence_location {data_dir}/",
        "pid_file": f"pid_file {data_dir / 'mosquitto.pid'}",
    }
    lines = []
    for line in template.splitlines():
        stripped = line.strip()
        key = stripped.split(maxsplit=1)[0] if stripped and not stripped.startswith("#") else ""
        lines.append(replacements.get(key, line))
    if os.geteuid() == 0:
        # Mosquitto 2 started as root drops to user "mosquitto", which cannot write a
        # data dir owned by root: keep root for a private, loopback-only broker.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard one (run in mosquitto's child).

    Mosquitto needs one descriptor per client and never raises its own limit: at the
    usual soft limit of 1024 it silently stops accepting at about 1,016 clients.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(host: str, port: int, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {proc.returncode} at start-up")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"mosquitto did not listen on {host}:{port} in time")


@dataclass
class LocalBroker:
    """A mosquitto process with the project config on a loopback port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    log_file: Path | None = None
    extra_config: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of this broker."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        """Where the rendered config is written."""
        return self.data_dir / "mosquitto.conf"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections (no-op if running)."""
        if self.pid is not None:
            return
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
            None,
        )
        if exe is None:
            raise BrokerError(MOSQUITTO_INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        template = find_broker_config().read_text()
        text = render_local_config(template, port=self.port, data_dir=self.data_dir, host=self.host)
        self.config_path.write_text(text + self.extra_config)
        log_path = self.log_file or self.data_dir / "mosquitto.log"
        self._log = log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [exe, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=raise_nofile_limit,  # noqa: PLW1509 - only setrlimit, async-signal-safe
        )
        try:
            _wait_for_port(self.host, self.port, time.monotonic() + timeout_s, self._proc)
        except BrokerError:
            self.stop()  # never leave a half-started broker or an open log behind
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop mosquitto cleanly (SIGTERM saves persistence), SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """Kill mosquitto with SIGKILL (no persistence save): a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop cleanly and start again on the same port and data directory."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Return what mosquitto has logged so far."""
        path = self.log_file or self.data_dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Self:
        """Start on entry."""
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop on exit."""
        self.stop()


