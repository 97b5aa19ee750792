"""Runs one shell command to completion: isolated, time-limited, with capped output.

How a command runs:

- ``/bin/sh -c COMMAND`` with stdin from ``/dev/null`` (an interactive prompt gets EOF
  and fails fast instead of hanging until the timeout), in a new session, so the shell
  leads its own process group and every process it starts can be signalled at once.
- Working directory: the agent user's home directory (``/`` when it does not exist), as
  with ``ssh host COMMAND``.
- Environment: built from scratch, never inherited, because the agent's own environment
  may hold secrets such as ``MQFLEET_BROKER_URL`` with a password. It holds exactly:

  ==================  =================================================================
  ``PATH``            ``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``
                      (the same on every node, whatever PATH started the agent)
  ``HOME``            the agent user's home directory (from the password database)
  ``USER``/``LOGNAME`` the agent user's name: many tools (git, ssh, mail) expect them
  ``SHELL``           ``/bin/sh``, the shell that runs the command
  ``LANG``            ``C.UTF-8``: tools write UTF-8, which is how output is decoded
  ``MQFLEET_*``       ``MQFLEET_COMMAND_ID`` and ``MQFLEET_NODE_ID`` when the caller
                      passes them, so a script can tag its own logs or lock files
  ==================  =================================================================

- Output: stdout and stderr are read concurrently as they arrive (a command writing
  megabytes never blocks on a full pipe); each stream keeps its first and last bytes, at
  most ``output_limit_bytes`` in all, and the text shows ``... [N bytes truncated] ...``
  where the middle was dropped. Bytes are decoded as UTF-8 with replacement characters.
- Timeout: SIGTERM to the whole process group, ``kill_grace_s`` to exit, then SIGKILL to
  the group. The shell is always reaped.
- The command's processes live only as long as the command: processes of its group still
  running when the shell exits (``daemon &``) get the same SIGTERM/SIGKILL treatment. A
  command that really wants to leave something running must start it in a session of its
  own (``setsid``); once the group is gone the pipes are read for ``DRAIN_S`` more seconds
  at most, so such an escaped process holding them open cannot stall the result.
- The command runs as the agent's user, or as ``run_as`` (a :class:`RunAs` built from
  the ``run_as_user`` setting): then the shell gets that user's uid, primary group and
  supplementary groups, and ``HOME``/``USER``/``LOGNAME`` and the working directory are
  that user's. Dropping to another user needs the agent to run as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from mqfleet.errors import ConfigError
from mqfleet.protocol import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from datetime import datetime

__all__ = [
    "DRAIN_S",
    "SHELL",
    "STANDARD_PATH",
    "CapturedOutput",
    "CommandExecutor",
    "Execution",
    "ExecutionStatus",
    "RunAs",
    "command_environment",
]

log = logging.getLogger(__name__)

SHELL: Final = "/bin/sh"
STANDARD_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Once the process group is gone, how long to keep reading pipes that an escaped
#: process (``setsid``) may still hold open.
DRAIN_S: Final = 0.5
#: How often the end of a process group is checked during the grace period.
_POLL_S: Final = 0.02
#: The shell's own codes for "not found" and "found but not executable" (POSIX 2.8.2).
_SHELL_EXIT_HINTS: Final = {
    126: "exit code 126: the shell found the command but could not execute it",
    127: "exit code 127: the shell did not find the command",
}

# A UTF-8 continuation byte is 10xxxxxx.
_UTF8_CONT_MASK: Final = 0xC0
_UTF8_CONT: Final = 0x80

ExecutionStatus = Literal["success", "failed", "timeout"]


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user (and groups) commands run as, instead of the agent's own user."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        """Resolve ``name`` (or a numeric uid) from the password database.

        Raises :class:`ConfigError` when there is no such user.
        """
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, OverflowError):
            raise ConfigError(f"run_as_user {name!r}: no such user on this node") from None
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")


def command_environment(
    extra: Mapping[str, str] | None = None, *, run_as: RunAs | None = None
) -> dict[str, str]:
    """Build the documented environment of a command (see the module docstring)."""
    if run_as is not None:
        home, name = run_as.home, run_as.name
    else:
        try:
            user = pwd.getpwuid(os.geteuid())
            home, name = user.pw_dir or "/", user.pw_name
        except KeyError:  # a uid without a passwd entry (some containers)
            home, name = "/", str(os.geteuid())
    env = {
        "PATH": STANDARD_PATH,
        "HOME": home,
        "USER": name,
        "LOGNAME": name,
        "SHELL": SHELL,
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def _utf8_head_end(data: bytes | bytearray) -> int:
    """Length of ``data`` without a multi-byte character cut off at its end."""
    # Walk back over at most 3 continuation bytes (10xxxxxx) to the lead byte.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & _UTF8_CONT_MASK == _UTF8_CONT:
            continue
        if byte < 0xC0 or byte >= 0xF8:  # noqa: PLR2004 - ASCII or invalid: nothing cut
            return len(data)
        needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4  # noqa: PLR2004 - UTF-8
        return len(data) - back if needed > back else len(data)
    return len(data)


def _utf8_tail_start(data: bytes | bytearray) -> int:
    """Index of the first byte of ``data`` that does not continue a cut-off character."""
    index = 0
    while index < min(3, len(data)) and data[index] & _UTF8_CONT_MASK == _UTF8_CONT:
        index += 1
    return index


class CapturedOutput:
    """One output stream: its first and last bytes, up to ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        """Keep ``limit // 2`` bytes of head and the rest as a rolling tail."""
        self.limit = limit
        self.total = 0
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes read from the stream."""
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            excess = len(self._tail) - self._tail_limit
            if excess > 0:
                del self._tail[:excess]

    def truncated(self, limit: int | None = None) -> bool:
        """Whether rendering at ``limit`` (default: the capture limit) drops bytes."""
        return self.total > min(limit or self.limit, self.limit)

    def render(self, limit: int | None = None) -> str:
        """Decode the stream, with a marker line where bytes were dropped to fit ``limit``."""
        limit = min(limit or self.limit, self.limit)
        if not self.truncated(limit):
            return bytes(self._head + self._tail).decode("utf-8", "replace")
        head_limit = limit // 2
        head = self._head[:head_limit]
        tail = self._tail[len(self._tail) - (limit - head_limit) :]
        # Cut at character boundaries so no replacement character is made up at the seams.
        head = head[: _utf8_head_end(head)]
        tail = tail[_utf8_tail_start(tail) :]
        dropped = self.total - len(head) - len(tail)
        text = head.decode("utf-8", "replace")
        lead = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{lead}... [{dropped} bytes truncated] ...\n{tail.decode('utf-8', 'replace')}"

    @property
    def text(self) -> str:
        """The text at the capture limit."""
        return self.render()


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    """What happened to one command: status, exit code, output and timing."""

    status: ExecutionStatus
    exit_code: int | None
    stdout: CapturedOutput
    stderr: CapturedOutput
    #: None when the command could not be started.
    started_at: datetime | None
    completed_at: datetime
    execution_time_ms: int
    error: str | None = None


def _outcome(
    returncode: int | None, *, timed_out: bool
) -> tuple[ExecutionStatus, int | None, str | None]:
    """Status, exit code and error of a shell that ended with ``returncode``."""
    if timed_out:
        return "timeout", None, None
    if returncode == 0:
        return "success", 0, None
    if returncode is None:  # cannot happen after wait(); say so rather than guess
        return "failed", None, "exit status unknown"
    if returncode < 0:
        # Killed by a signal nobody here sent: report what the shell's $? would show.
        name = signal.Signals(-returncode).name
        return "failed", 128 - returncode, f"terminated by signal {name}"
    return "failed", returncode, _SHELL_EXIT_HINTS.get(returncode)


class _PipeCapture(asyncio.Protocol):
    """Feeds whatever arrives on a pipe into a :class:`CapturedOutput`."""

    def __init__(self, output: CapturedOutput, done: asyncio.Future[None]) -> None:
        self._output = output
        self._done = done

    def data_received(self, data: bytes) -> None:
        self._output.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - EOF either way
        if not self._done.done():
            self._done.set_result(None)


async def _capture(
    fd: int, output: CapturedOutput
) -> tuple[asyncio.BaseTransport, asyncio.Future[None]]:
    """Read the pipe ``fd`` (now owned here) into ``output``; the future is its EOF."""
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(fd, "rb", buffering=0)
    done: asyncio.Future[None] = loop.create_future()
    try:
        transport, _ = await loop.connect_read_pipe(partial(_PipeCapture, output, done), pipe)
    except BaseException:
        pipe.close()
        raise
    return transport, done


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # e.g. a setuid member: it exists, we just cannot signal it
        return True
    return True


class _Shell:
    """The spawned shell: pid, exit status, and its exit as something to await.

    Not ``asyncio.create_subprocess_exec``: on Python 3.11 its child watcher starts a
    thread per process to wait for it, which costs about half a millisecond per command.
    A pidfd (Linux >= 5.3) becomes readable when the process exits, so the event loop
    itself notices; elsewhere a worker thread waits, as asyncio's watcher would.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        """The exit status once the shell has ended (and is reaped), else None."""
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait for the shell to end and reap it; return its exit status."""
        returncode = self._popen.poll()
        if returncode is not None:
            return returncode
        if self._pidfd is None:
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(self._pidfd)
        return self._popen.wait()  # it has exited: this reaps it at once

    def close(self) -> None:
        """Release the pidfd (call once the shell is reaped)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class CommandExecutor:
    """Runs shell commands the documented way; one instance serves many concurrent runs."""

    def __init__(
        self,
        *,
        output_limit_bytes: int,
        kill_grace_s: float,
        drain_s: float = DRAIN_S,
        run_as: RunAs | None = None,
    ) -> None:
        """Configure the executor.

        Args:
            output_limit_bytes: bytes kept per stream (head and tail).
            kill_grace_s: seconds between SIGTERM and SIGKILL of the process group.
            drain_s: seconds to keep reading pipes once the process group is gone.
            run_as: run commands as this user (the agent must be root), else as ours.

        """
        self._limit = output_limit_bytes
        self._grace = kill_grace_s
        self._drain = drain_s
        self._run_as = run_as
        # setuid/setgid/setgroups in the child, before exec; only given when dropping.
        self._identity: dict[str, Any] = (
            {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
            if run_as is not None
            else {}
        )
        self._env = command_environment(run_as=run_as)
        home = Path(self._env["HOME"])
        self._cwd = home if home.is_dir() else Path("/")

    async def run(
        self,
        command_text: str,
        *,
        timeout_s: float,
        extra_env: Mapping[str, str] | None = None,
        on_start: Callable[[datetime], None] | None = None,
    ) -> Execution:
        """Run ``command_text`` to completion; ``on_start`` is called once it is spawned.

        Never raises for the command's sake (could not start -> ``failed``); exceptions
        from ``on_start`` and cancellation propagate after the process group is killed.
        """
        stdout, stderr = CapturedOutput(self._limit), CapturedOutput(self._limit)
        clock = time.monotonic()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = _Shell(
                # S603: running the operator's command is the job. ASYNC220: fork + exec
                # is quick, and asyncio's create_subprocess_exec does it on the loop too.
                subprocess.Popen(  # noqa: S603, ASYNC220
                    [SHELL, "-c", command_text],
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    start_new_session=True,
                    env={**self._env, **(extra_env or {})},
                    cwd=self._cwd,
                    **self._identity,
                )
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the command
            os.close(out_r)
            os.close(err_r)
            return Execution(
                status="failed",
                exit_code=None,
                stdout=stdout,
                stderr=stderr,
                started_at=None,
                completed_at=utc_now(),
                execution_time_ms=0,
                error=f"could not start {SHELL}: {exc}",
            )
        finally:
            # The child has its own copies; ours must go or EOF never comes.
            os.close(out_w)
            os.close(err_w)
        started_at = utc_now()
        log.debug("command started: pid %d", proc.pid)
        pgid = proc.pid  # start_new_session: the shell leads its own process group
        captures: list[tuple[asyncio.BaseTransport, asyncio.Future[None]]] = []
        finished = False
        try:
            for fd, output in ((out_r, stdout), (err_r, stderr)):
                captures.append(await _capture(fd, output))
            if on_start is not None:
                on_start(started_at)
            timed_out = False
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
            escalated = await self._end_group(proc, pgid)
            elapsed_ms = int((time.monotonic() - clock) * 1000)
            # Pipes reach EOF once every holder is gone; an escaped holder gets DRAIN_S.
            _, pending = await asyncio.wait([eof for _, eof in captures], timeout=self._drain)
            if pending:
                log.warning("command pid %d: output pipes still open after its group ended", pgid)
            finished = True
        finally:
            if not finished:  # cancelled or on_start failed: leave nothing behind
                _signal_group(pgid, signal.SIGKILL)
                await proc.wait()  # SIGKILL cannot be caught: this is quick; always reap
            for transport, _ in captures:
                transport.close()
            proc.close()
            for fd in (out_r, err_r)[len(captures) :]:  # not yet owned by a transport
                os.close(fd)
        status, exit_code, error = _outcome(proc.returncode, timed_out=timed_out)
        if timed_out:
            how = f"SIGKILL after {self._grace:g} s of SIGTERM grace" if escalated else "SIGTERM"
            error = f"timed out after {timeout_s:g} s; process group ended with {how}"
        return Execution(
            status=status,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            started_at=started_at,
            completed_at=utc_now(),
            execution_time_ms=elapsed_ms,
            error=error,
        )

    async def _end_group(self, proc: _Shell, pgid: int) -> bool:
        """Make sure no process of the group survives; True when SIGKILL was needed."""
        if proc.returncode is not None and not _group_exists(pgid):
            return False  # the common case: the shell exited and took everything along
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline:
            if proc.returncode is not None and not _group_exists(pgid):
                return False
            await asyncio.sleep(_POLL_S)
        # Orphans that exited may linger as zombies until init reaps them: they count as
        # existing for kill(0), which is why SIGKILL, not a further wait, ends the grace.
        _signal_group(pgid, signal.SIGKILL)
        await proc.wait()  # SIGKILL cannot be caught: the shell is gone and reaped now
        return True
