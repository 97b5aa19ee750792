"""``mqfleet collector --workers N``: one collector service made of N ingest processes.

Why processes: a collector receives through paho, whose packet parsing is pure Python
and holds the GIL, so one process tops out at about 10,000 metrics/s on this class of
machine whatever the database does (docs/BENCHMARKS.md). N workers share the fleet
through one MQTT 5 shared-subscription group, exactly like the separate collectors of
docs/SCALING.md, but under one command, one config and one service unit.

The supervisor here holds no MQTT connection and no database (it stays a small process:
it never imports the collector). It runs ``mqfleet db upgrade`` once, so N workers
never race to migrate a new database, then starts N children ``python -m mqfleet ...
collector --worker``, each an ordinary collector with

* ``collector_id = <collector_id>-<i>``, the same on every restart: the broker keeps a
  member's share of messages in the session of that id while it is down;
* ``collector_group = collector_group or collector_id``: one service, one group.

Three pipes tie a worker to the supervisor: its stdin, never written, closes when the
supervisor is gone (even SIGKILLed) and the worker then stops, so no orphan holds an id
the next supervisor's worker needs; its stdout carries its fatal error, one line; its
stderr is the supervisor's, and its log lines carry its id.

A worker that dies is restarted under the same id after a capped backoff. One that
exits with code 2 (configuration) or 3 (credentials refused, database unreachable)
stops the whole service with that code and one line: restarting cannot fix those.
SIGTERM/SIGINT stop every worker (SIGTERM, then SIGKILL after a grace) and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import click

from mqfleet.cli.exitcodes import ExitCode, exit_code_for
from mqfleet.errors import ConfigError, MqfleetError
from mqfleet.loops import run_loops
from mqfleet.runtime import serve

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from mqfleet.cli.app import CliState
    from mqfleet.settings import Settings

__all__ = [
    "FATAL_EXIT_CODES",
    "WorkerFailedError",
    "WorkerSpec",
    "WorkerSupervisor",
    "serve_worker",
    "serve_workers",
    "worker_specs",
]

log = logging.getLogger(__name__)

#: Exit codes of a worker that a restart cannot fix: the service stops with them.
FATAL_EXIT_CODES: Final = frozenset({ExitCode.USAGE, ExitCode.UNREACHABLE})
#: Time a worker gets after SIGTERM to commit, acknowledge and say "offline" (the
#: collector bounds its own shutdown by 10 s) before it is killed.
STOP_GRACE_S: Final = 15.0
#: Restart delays of a worker that died: doubling from the first to the last.
RESTART_INITIAL_S: Final = 1.0
RESTART_MAXIMUM_S: Final = 30.0
#: A worker that ran this long before it died restarts after the first delay again.
STABLE_AFTER_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start one worker: its name (its collector_id), argv and extra environment."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]


class WorkerFailedError(MqfleetError):
    """A worker exited with a code a restart cannot fix; the service stops with that code."""

    def __init__(self, name: str, exit_code: int, reason: str) -> None:
        """Bind the worker's name, its exit code and its one-line reason (may be empty)."""
        detail = reason or f"exited with code {exit_code} (see its messages above)"
        super().__init__(f"collector worker {name}: {detail}")
        self.name = name
        self.exit_code = exit_code


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerSupervisor:
    """Keeps worker processes running until cancelled; see the module docstring."""

    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        *,
        fatal_exit_codes: Collection[int] = FATAL_EXIT_CODES,
        stop_grace_s: float = STOP_GRACE_S,
        restart_initial_s: float = RESTART_INITIAL_S,
        restart_maximum_s: float = RESTART_MAXIMUM_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        """Prepare to run ``workers``.

        Args:
            workers: one spec per worker process; names must be unique.
            fatal_exit_codes: a worker exiting with one of these stops the service.
            stop_grace_s: time between SIGTERM and SIGKILL at shutdown.
            restart_initial_s: delay before restarting a worker that died.
            restart_maximum_s: the delay doubles up to this while a worker keeps dying.
            stable_after_s: a worker that ran this long restarts after the first delay.

        """
        names = [spec.name for spec in workers]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique: {names}")
        self._workers = tuple(workers)
        self._fatal = frozenset(fatal_exit_codes)
        self._stop_grace_s = stop_grace_s
        self._restart_initial_s = restart_initial_s
        self._restart_maximum_s = restart_maximum_s
        self._stable_after_s = stable_after_s
        self._running: dict[str, asyncio.subprocess.Process] = {}
        #: How many times each worker was restarted, by name.
        self.restarts: dict[str, int] = dict.fromkeys(names, 0)

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each worker running now, by name."""
        return {name: proc.pid for name, proc in self._running.items()}

    async def run(self) -> None:
        """Run every worker until cancelled or one fails for good; then stop them all.

        Raises :class:`WorkerFailedError` when a worker exits with a fatal code.
        """
        loops = {
            f"worker_loop[{spec.name}]": functools.partial(self._worker_loop, spec)
            for spec in self._workers
        }
        try:
            await run_loops(loops)
        finally:
            await self._stop_all()

    async def _worker_loop(self, spec: WorkerSpec) -> None:
        """Start the worker, wait for its end, restart it after a delay; forever."""
        delay = self._restart_initial_s
        while True:
            started = time.monotonic()
            proc = await self._start(spec)
            report = await proc.stdout.read() if proc.stdout is not None else b""
            code = await proc.wait()
            self._forget(spec.name, proc)
            lines = report.decode(errors="replace").strip().splitlines()
            if code in self._fatal:
                raise WorkerFailedError(spec.name, code, lines[-1].strip() if lines else "")
            if time.monotonic() - started >= self._stable_after_s:
                delay = self._restart_initial_s
            log.warning(
                "collector worker %s (pid %d) %s%s; restarting it in %.1fs",
                spec.name,
                proc.pid,
                _how_it_ended(code),
                f": {lines[-1].strip()}" if lines else "",
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._restart_maximum_s)
            self.restarts[spec.name] += 1

    async def _start(self, spec: WorkerSpec) -> asyncio.subprocess.Process:
        # Its own session: a Ctrl-C on the terminal reaches only the supervisor, which
        # stops the workers once and in order. stdin is the pipe whose end tells the
        # worker that we are gone; if we are cancelled while it starts, asyncio kills it.
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **spec.env},
            start_new_session=True,
        )
        self._running[spec.name] = proc
        log.info("started collector worker %s (pid %d)", spec.name, proc.pid)
        return proc

    def _forget(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self._running.pop(name, None)
        if proc.stdin is not None:
            proc.stdin.close()

    async def _stop_all(self) -> None:
        """SIGTERM every worker, wait up to the grace, then SIGKILL those still running."""
        running = dict(self._running)
        for proc in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            if running:
                log.info("stopping %d collector worker(s)", len(running))
                waits = [asyncio.ensure_future(proc.wait()) for proc in running.values()]
                await asyncio.wait(waits, timeout=self._stop_grace_s)
        finally:
            # Also reached when a second signal cancels the wait: then kill at once.
            for name, proc in running.items():
                if proc.returncode is None:
                    log.warning("collector worker %s did not stop in time: killing it", name)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                self._forget(name, proc)


def worker_specs(state: CliState, settings: Settings) -> list[WorkerSpec]:
    """Describe the ``collector_workers`` children of the collector ``settings`` describe.

    They run the same command line (global flags) and environment as we do, with their
    own ``collector_id``, the service's group and one worker each. Settings travel in
    the environment, as they beat the config file there; a ``--broker`` URL too, since
    it may hold a token (argv is readable by every user, the environment is not).
    """
    base = (sys.executable, "-m", "mqfleet", *state.child_flags(), "collector", "--worker")
    shared = {
        "MQFLEET_COLLECTOR_GROUP": settings.collector_group or settings.collector_id,
        "MQFLEET_COLLECTOR_WORKERS": "1",
    }
    if state.broker_url is not None:
        shared["MQFLEET_BROKER_URL"] = state.broker_url
    return [
        WorkerSpec(
            name=f"{settings.collector_id}-{i}",
            argv=base,
            env={**shared, "MQFLEET_COLLECTOR_ID": f"{settings.collector_id}-{i}"},
        )
        for i in range(1, settings.collector_workers + 1)
    ]


def _check(state: CliState, settings: Settings) -> None:
    """Refuse, in one line, what would make every worker fail or hear nothing."""
    if settings.mqtt_version != "5":
        # MQTT 3.1.1 has no shared subscriptions: each worker would store every message.
        raise ConfigError(
            "collector_workers > 1 needs mqtt_version 5 (the workers share the fleet "
            "through an MQTT 5 shared subscription); on MQTT 3.1.1 run one worker"
        )
    if not settings.collector_group:
        try:
            state.settings(local_fleet=False, collector_group=settings.collector_id)
        except ConfigError:
            raise ConfigError(
                "collector_workers > 1 puts the workers in one shared-subscription group, "
                f"by default named after collector_id, but {settings.collector_id!r} cannot "
                "name one (one topic level: no '/', '+', '#', at most 64 characters): "
                "set collector_group"
            ) from None


def _migrate(state: CliState, settings: Settings) -> int:
    """Run ``mqfleet db upgrade`` once before the workers start; return its exit code.

    Its one-line error, if any, goes to our stderr as it is.
    """
    argv = [sys.executable, "-m", "mqfleet", *state.child_flags(), "db", "upgrade"]
    # The collector's database, even where `db upgrade` alone would read another config.
    env = {**os.environ, "MQFLEET_DATABASE_URL": settings.database_url}
    done = subprocess.run(  # noqa: S603 - our own interpreter and fixed arguments
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, check=False
    )
    return done.returncode


def serve_workers(state: CliState, settings: Settings) -> int:
    """Run ``settings.collector_workers`` collector workers until SIGTERM/SIGINT.

    Returns the exit code: 0 after a signal, else a worker's fatal exit code.
    """
    _check(state, settings)
    specs = worker_specs(state, settings)
    code = _migrate(state, settings)
    if code != ExitCode.OK:
        return code
    supervisor = WorkerSupervisor(specs)
    log.info(
        "collector %s: %d workers in shared-subscription group %r",
        settings.collector_id,
        len(specs),
        specs[0].env["MQFLEET_COLLECTOR_GROUP"],
    )

    async def collector_workers(_settings: Settings) -> None:
        await supervisor.run()

    try:
        serve(collector_workers, settings)
    except WorkerFailedError as exc:
        # Like every CLI error, but with the worker's exit code (2 or 3), not ours.
        click.echo(f"mqfleet: error: {exc}", err=True)
        return exc.exit_code
    return ExitCode.OK


def serve_worker(settings: Settings) -> int:
    """Run one worker of ``collector --workers N`` (the hidden ``collector --worker``)."""
    from mqfleet.collector import run_collector  # noqa: PLC0415 - lean supervisor

    try:
        serve(run_collector, settings, supervised=True)
    except MqfleetError as exc:
        # One line on stdout, the pipe to the supervisor, which reports it once for the
        # whole service (rather than once per worker) and exits with our code.
        click.echo("; ".join(line.strip() for line in str(exc).splitlines() if line.strip()))
        return exit_code_for(exc)
    return ExitCode.OK
