"""Run a private Mosquitto with the project's ``broker/`` config on a loopback port.

Used by ``mqfleet up`` (the newcomer's local fleet), the test suite and the benchmarks.
Only the listener, persistence directory, pid file, password file and ACL paths of the
shipped config are rewritten (into the broker's data dir); every other line (no
anonymous access, limits, TCP_NODELAY, persistence) is the production one.

``LocalBroker(auth=False)`` is the one exception, for component tests that are not
about security: it turns anonymous access on and drops the password file and ACL.
An ``extra_config`` that sets any of ``allow_anonymous``, ``password_file`` or
``acl_file`` takes authentication over: those three lines of the shipped config are
dropped and the extra lines alone decide.
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
    "ACL_FILE_NAME",
    "MOSQUITTO_INSTALL_HINT",
    "PASSWORD_FILE_NAME",
    "LocalBroker",
    "find_broker_config",
    "find_mosquitto",
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
#: The lines of the shipped config that decide who may log in and do what.
_AUTH_KEYS: Final = frozenset({"allow_anonymous", "password_file", "acl_file"})
#: Names of the password file and ACL inside a local broker's data dir.
PASSWORD_FILE_NAME: Final = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE_NAME: Final = "acl"


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


def _config_keys(text: str) -> set[str]:
    """Return the option names set by the mosquitto config ``text``."""
    return {
        line.split(maxsplit=1)[0]
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    }


def render_local_config(
    template: str,
    *,
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    auth: bool = True,
    drop: frozenset[str] = frozenset(),
) -> str:
    """Rewrite the shipped config for a private broker on ``host:port`` in ``data_dir``.

    With ``auth`` (the default) the password file and ACL are ``data_dir/passwd`` and
    ``data_dir/acl``; without it anonymous access is on and both lines are dropped.
    Lines setting an option in ``drop`` are left out.
    """
    replacements: dict[str, str | None] = {
        "listener": f"listener {port} {host}",
        "persistence_location": f"persistence_location {data_dir}/",
        "pid_file": f"pid_file {data_dir / 'mosquitto.pid'}",
        "password_file": f"password_file {data_dir / PASSWORD_FILE_NAME}" if auth else None,
        "acl_file": f"acl_file {data_dir / ACL_FILE_NAME}" if auth else None,
        "allow_anonymous": f"allow_anonymous {'false' if auth else 'true'}",
    }
    lines = []
    for line in template.splitlines():
        stripped = line.strip()
        key = stripped.split(maxsplit=1)[0] if stripped and not stripped.startswith("#") else ""
        replacement = None if key in drop else replacements.get(key, line)
        if replacement is not None:
            lines.append(replacement)
    if os.geteuid() == 0:
        # Mosquitto 2 started as root drops to user "mosquitto", which cannot write a
        # data dir owned by root: keep root for a private, loopback-only broker.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit in force.

    Mosquitto needs one descriptor per client and never raises its own limit: at the
    usual soft limit of 1024 it silently stops accepting at about 1,016 clients (this
    runs in mosquitto's child before exec). The simulator holds one socket per node.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def find_mosquitto() -> str:
    """Return the mosquitto executable; :class:`BrokerError` with the install hint if none."""
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if exe is None:
        raise BrokerError(MOSQUITTO_INSTALL_HINT)
    return exe


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _create_private_if_missing(path: Path) -> None:
    # Empty means "no account" / "nothing allowed": safe until the caller fills it.
    # O_EXCL + 0600: never clobber a file the caller wrote, never expose one.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


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
    """A mosquitto process with the project config on a loopback port.

    With ``auth`` (the default) clients must log in with an account of
    :attr:`password_file`, and :attr:`acl_file` decides what they may do. Both are
    created empty (nobody may log in or do anything) when missing; fill them before
    :meth:`start`, or afterwards and :meth:`reload`.
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    log_file: Path | None = None
    extra_config: str = ""
    auth: bool = True
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
    def password_file(self) -> Path:
        """The broker's password file (used when ``auth`` is on)."""
        return self.data_dir / PASSWORD_FILE_NAME

    @property
    def acl_file(self) -> Path:
        """The broker's ACL file (used when ``auth`` is on)."""
        return self.data_dir / ACL_FILE_NAME

    @property
    def pid_file(self) -> Path:
        """The pid file mosquitto writes (for ``reload_broker``)."""
        return self.data_dir / "mosquitto.pid"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections (no-op if running)."""
        if self.pid is not None:
            return
        exe = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # An extra config that touches authentication takes all of it over.
        custom_auth = bool(_config_keys(self.extra_config) & _AUTH_KEYS)
        if self.auth and not custom_auth:
            for path in (self.password_file, self.acl_file):
                _create_private_if_missing(path)
        template = find_broker_config().read_text()
        text = render_local_config(
            template,
            port=self.port,
            data_dir=self.data_dir,
            host=self.host,
            auth=self.auth,
            drop=_AUTH_KEYS if custom_auth else frozenset(),
        )
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

    def reload(self) -> bool:
        """Make the running broker reread its password file and ACL (SIGHUP)."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        self._proc.send_signal(signal.SIGHUP)
        return True

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
