"""Running an mqfleet process: exit codes, one-line errors, logging, services until a signal.

Shared by the two entry points, ``mqfleet`` (the click CLI) and ``mqfleet-agent`` (the
agent alone, without click: what nodes run), with the duration syntax of their flags.
Nothing here imports click.
"""

from __future__ import annotations

import io
import os
import re
import sys
from datetime import timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

from mqfleet.errors import (
    BrokerError,
    ConfigError,
    MqfleetError,
    ProtocolError,
    StoreError,
    UnknownCommandError,
    UnknownNodeError,
)

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop
    from collections.abc import Callable, Coroutine

    from mqfleet.settings import Settings

__all__ = [
    "ExitCode",
    "configure_logging",
    "exit_code_for",
    "one_line",
    "parse_duration",
    "report_failure",
    "safe_streams",
    "serve",
]

_HANDLER_NAME: Final = "mqfleet-cli"
_LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STDIN: Final = 0
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE: Final = re.compile(r"(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[smhd]?)")
_HINT: Final = "use a number with s, m, h or d, e.g. 30s, 10m, 1h, 7d"
#: Far beyond any sensible window, yet within what datetime arithmetic can represent.
_MAX: Final = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``/``10m``/``1h``/``7d`` or plain seconds; ValueError says how to fix it."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid duration {text!r}: {_HINT}")
    value = timedelta(seconds=float(match["amount"]) * _UNITS[match["unit"] or "s"])
    if value <= timedelta(0):
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    if value > _MAX:
        raise ValueError(f"invalid duration {text!r}: at most {_MAX.days} days")
    return value


class ExitCode(IntEnum):
    """Process exit codes of every ``mqfleet`` command."""

    OK = 0
    #: A command failed, timed out, expired or got no answer (or a service failed).
    FAILED = 1
    #: Usage error, invalid config, unknown node or command.
    USAGE = 2
    #: The broker or the database cannot be reached.
    UNREACHABLE = 3
    #: ``run`` only: some targets are offline and their commands are queued.
    QUEUED = 4
    #: Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    INTERRUPTED = 130


def exit_code_for(exc: MqfleetError) -> ExitCode:
    """Map an error of the exception tree to its documented exit code."""
    if isinstance(exc, (ConfigError, ProtocolError, UnknownNodeError, UnknownCommandError)):
        return ExitCode.USAGE
    if isinstance(exc, (BrokerError, StoreError)):
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED


def one_line(text: str) -> str:
    """Join a message's non-blank lines with "; ": errors are always one line."""
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def report_failure(prog: str, exc: Exception, *, verbose: bool) -> int:
    """Print ``PROG: error: ...`` for ``exc`` on one line; return its exit code.

    Errors of the tree are expected and say what to fix; anything else is a bug, shown
    as one line too, with its traceback only under -v (the last line of defence of both
    entry points).
    """
    if isinstance(exc, MqfleetError):
        message, code = str(exc), exit_code_for(exc)
    else:
        if verbose:
            import traceback  # noqa: PLC0415 - only bugs need it

            traceback.print_exc()
        hint = "" if verbose else " (run with -v for the traceback)"
        message, code = f"unexpected {type(exc).__name__}: {exc}{hint}", ExitCode.FAILED
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()
    return code


def safe_streams() -> None:
    """Print a replacement character for what stdout/stderr cannot encode, never crash."""
    # Command output may hold anything (lone surrogates, characters the locale cannot
    # encode): print a replacement character rather than crash with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def configure_logging(*, verbose: bool, level: int | None = None, label: str | None = None) -> None:
    """Log to stderr: DEBUG with -v, else ``level`` (WARNING if None; entry points only).

    ``label`` goes into every line, in brackets: the id of a collector worker, whose
    lines share the supervisor's stderr with its siblings'.
    """
    import logging  # noqa: PLC0415 - the read commands start without it

    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    fmt = _LOG_FORMAT
    if label is not None:
        fmt = fmt.replace("%(name)s", f"[{label.replace('%', '%%')}] %(name)s")
    handler.setFormatter(logging.Formatter(fmt))
    root.setLevel(logging.DEBUG if verbose else (level or logging.WARNING))
    # Alembic announces each of its plugins at INFO on every start; only -v wants that.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _on_end_of_stdin(loop: AbstractEventLoop, stop: Callable[[str], None]) -> None:
    """Call ``stop`` when stdin ends: the supervisor holding the pipe's other end is gone."""

    def on_readable() -> None:
        try:
            data = os.read(_STDIN, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(_STDIN)
            stop("end of stdin (the supervisor is gone)")

    loop.add_reader(_STDIN, on_readable)


def serve(
    entry: Callable[[Settings], Coroutine[Any, Any, None]],
    settings: Settings,
    *,
    supervised: bool = False,
) -> None:
    """Run a service until SIGTERM/SIGINT, which cancel it so it can shut down cleanly.

    ``supervised`` is for the workers of ``collector --workers N``: they stop too when
    their stdin closes (the supervisor is gone, even SIGKILLed), and only the first
    stop request counts (systemd signals every process of a unit while the supervisor
    forwards its own signal; the supervisor escalates to SIGKILL itself).
    """
    import asyncio  # noqa: PLC0415 - lean start-up: the read commands never need it
    import logging  # noqa: PLC0415 - idem
    import signal  # noqa: PLC0415 - idem

    log = logging.getLogger(__name__)

    async def supervise() -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.create_task(entry(settings), name=entry.__name__)
        signals_seen: list[str] = []

        def on_signal(name: str) -> None:
            if supervised and signals_seen:
                return
            signals_seen.append(name)
            # A second signal cancels again: it interrupts a shutdown that hangs
            # (e.g. publishing "offline" to a broker that is gone).
            log.info("%s received: %s", name, "stopping" if len(signals_seen) == 1 else "again")
            main_task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        if supervised:
            _on_end_of_stdin(loop, on_signal)
        try:
            await main_task
        except asyncio.CancelledError:
            # Our own cancellation (a signal) is a clean stop; any other is not ours to eat.
            if not signals_seen:
                raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if supervised:
                loop.remove_reader(_STDIN)

    asyncio.run(supervise())
