"""The supervisor of ``collector --workers N``, with small Python scripts as its workers.

The real workers (collectors on mosquitto and both databases) are exercised in
tests/collector/test_workers.py; here each worker is a few lines of Python that exit,
print or ignore signals on cue, so restarts, fatal exits and shutdown are checked fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mqfleet.cli.app import CliState
from mqfleet.cli.workers import WorkerFailedError, WorkerSpec, WorkerSupervisor, worker_specs
from mqfleet.settings import load_settings

DEADLINE_S = 20.0


def script_worker(name: str, code: str, **env: str) -> WorkerSpec:
    return WorkerSpec(name, (sys.executable, "-c", textwrap.dedent(code)), env)


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.asynccontextmanager
async def running(supervisor: WorkerSupervisor):
    task = asyncio.create_task(supervisor.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, WorkerFailedError):
            await task


# Appends one line per start to $STARTS, then exits 1 for the first $CRASHES starts and
# otherwise waits for SIGTERM (exit 0).
CRASHING = """
    import os, signal, sys, time
    path = os.environ["STARTS"]
    with open(path, "a") as f:
        f.write(f"{time.monotonic()} {os.environ['WORKER']}\\n")
    if len(open(path).read().splitlines()) <= int(os.environ["CRASHES"]):
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(60)
"""
# Says "ready" in $READY once its SIGTERM handler is in place, which writes $STOPPED.
SLEEPER = """
    import os, signal, sys, time
    def stop(*_):
        open(os.environ["STOPPED"], "w").write("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    open(os.environ["READY"], "w").write("ready")
    time.sleep(60)
"""


async def test_a_worker_that_dies_is_restarted_under_the_same_spec(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    spec = script_worker("w-1", CRASHING, STARTS=str(starts), CRASHES="2", WORKER="w-1")
    supervisor = WorkerSupervisor([spec], restart_initial_s=0.01)
    async with running(supervisor):
        await wait_until(lambda: supervisor.restarts["w-1"] == 2, "two restarts")
        await wait_until(lambda: len(starts.read_text().splitlines()) == 3, "a third start")
        pid = supervisor.pids["w-1"]
    # Same name, same environment each time: the collector id a restart must keep.
    assert [line.split()[1] for line in starts.read_text().splitlines()] == ["w-1"] * 3
    assert gone(pid)


async def test_the_restart_delay_doubles_up_to_its_cap(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    spec = script_worker("w-1", CRASHING, STARTS=str(starts), CRASHES="4", WORKER="w-1")
    supervisor = WorkerSupervisor([spec], restart_initial_s=0.2, restart_maximum_s=0.4)
    async with running(supervisor):
        await wait_until(lambda: supervisor.restarts["w-1"] == 4, "four restarts")
    times = [float(line.split()[0]) for line in starts.read_text().splitlines()]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each gap is the delay plus a Python start-up: at least 0.2, 0.4, then capped at 0.4.
    assert gaps[0] >= 0.2
    assert all(gap >= 0.4 for gap in gaps[1:])
    assert min(gaps[1:]) < 0.4 + 1.5, "capped, not doubling on"


async def test_a_fatal_exit_stops_the_service_with_the_worker_s_code_and_line(
    tmp_path: Path,
) -> None:
    stopped, ready, go = tmp_path / "stopped", tmp_path / "ready", tmp_path / "go"
    # w-1 fails only once the test has seen both running and said "go": on a loaded
    # machine it could otherwise start, fail and be gone between two polls.
    failing = script_worker(
        "w-1",
        """
        import os, time
        while not (os.path.exists(os.environ["READY"]) and os.path.exists(os.environ["GO"])):
            time.sleep(0.01)
        print("collector log noise first")
        print("broker mqtt://h:1883 refused the collector: Bad user name or password")
        raise SystemExit(3)
        """,
        READY=str(ready),
        GO=str(go),
    )
    sibling = script_worker("w-2", SLEEPER, STOPPED=str(stopped), READY=str(ready))
    supervisor = WorkerSupervisor([failing, sibling], restart_initial_s=0.01)
    task = asyncio.create_task(supervisor.run())
    await wait_until(lambda: len(supervisor.pids) == 2, "both started")
    sibling_pid = supervisor.pids["w-2"]
    go.write_text("go")
    with pytest.raises(WorkerFailedError) as caught:
        await asyncio.wait_for(task, DEADLINE_S)
    assert caught.value.exit_code == 3
    assert str(caught.value) == (
        "collector worker w-1: broker mqtt://h:1883 refused the collector: "
        "Bad user name or password"
    )
    assert supervisor.restarts == {"w-1": 0, "w-2": 0}
    assert stopped.read_text() == "SIGTERM"
    assert gone(sibling_pid)
    assert supervisor.pids == {}


async def test_a_fatal_exit_without_a_line_points_at_the_worker_s_messages() -> None:
    supervisor = WorkerSupervisor([script_worker("w-1", "raise SystemExit(2)")])
    with pytest.raises(WorkerFailedError, match=r"w-1: exited with code 2 \(see its messages"):
        await asyncio.wait_for(supervisor.run(), DEADLINE_S)


async def test_cancelling_stops_every_worker_and_kills_one_that_ignores_sigterm(
    tmp_path: Path,
) -> None:
    stopped, ready, ignoring = tmp_path / "stopped", tmp_path / "ready", tmp_path / "ignoring"
    polite = script_worker("w-1", SLEEPER, STOPPED=str(stopped), READY=str(ready))
    stubborn = script_worker(
        "w-2",
        """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(os.environ["READY"], "w").write("ready")
        time.sleep(60)
        """,
        READY=str(ignoring),
    )
    supervisor = WorkerSupervisor([polite, stubborn], stop_grace_s=1.0)
    task = asyncio.create_task(supervisor.run())
    await wait_until(lambda: len(supervisor.pids) == 2, "both started")
    await wait_until(lambda: ready.exists() and ignoring.exists(), "signal handlers set")
    pids = supervisor.pids
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 1.0 <= time.monotonic() - t0 < 10
    assert stopped.read_text() == "SIGTERM"
    assert all(gone(pid) for pid in pids.values())
    assert supervisor.pids == {}


async def test_a_worker_sees_its_stdin_close_when_the_supervisor_goes(tmp_path: Path) -> None:
    # What lets a worker outlive a SIGKILLed supervisor by no more than its shutdown.
    seen = tmp_path / "seen"
    spec = script_worker(
        "w-1",
        """
        import os, sys
        sys.stdin.buffer.read()
        open(os.environ["SEEN"], "w").write("EOF")
        """,
        SEEN=str(seen),
    )
    supervisor = WorkerSupervisor([spec], restart_initial_s=30)
    async with running(supervisor):
        await wait_until(lambda: "w-1" in supervisor.pids, "started")
        # As if the supervisor died: its end of the pipe closes (the kernel does that).
        supervisor._running["w-1"].stdin.close()  # type: ignore[union-attr]
        await wait_until(seen.exists, "the worker saw EOF")
    assert seen.read_text() == "EOF"


def test_duplicate_worker_names_are_refused() -> None:
    spec = script_worker("w-1", "pass")
    with pytest.raises(ValueError, match="unique"):
        WorkerSupervisor([spec, spec])


# -- what each worker gets -----------------------------------------------------------
def test_workers_get_numbered_ids_one_group_and_the_same_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text('collector_id = "ingest"\ncollector_workers = 3\n')
    state = CliState(
        config_file=config,
        broker_url="mqtt://collector:s3cret@broker:1883",
        database_url="postgresql://db/fleet",
        verbose=True,
    )
    settings = state.settings(local_fleet=False)
    specs = worker_specs(state, settings)
    assert [spec.name for spec in specs] == ["ingest-1", "ingest-2", "ingest-3"]
    for spec in specs:
        assert spec.argv[:3] == (sys.executable, "-m", "mqfleet")
        assert spec.argv[-2:] == ("collector", "--worker")
        assert ["--config", str(config)] == list(spec.argv[3:5])
        assert "--verbose" in spec.argv
        assert "--database" in spec.argv
        # The token travels in the environment, never in argv (readable by every user).
        assert not any("s3cret" in arg for arg in spec.argv)
        assert spec.env["MQFLEET_BROKER_URL"] == "mqtt://collector:s3cret@broker:1883"
        assert spec.env["MQFLEET_COLLECTOR_ID"] == spec.name
        assert spec.env["MQFLEET_COLLECTOR_GROUP"] == "ingest"
        assert spec.env["MQFLEET_COLLECTOR_WORKERS"] == "1"
    # The environment beats the config file: each worker loads exactly its own settings.
    for key, value in specs[1].env.items():
        monkeypatch.setenv(key, value)
    worker = CliState(config_file=config).settings(local_fleet=False)
    assert (worker.collector_id, worker.collector_group, worker.collector_workers) == (
        "ingest-2",
        "ingest",
        1,
    )


def test_a_configured_group_is_kept() -> None:
    settings = load_settings(collector_workers=2, collector_group="fleet-ingest")
    specs = worker_specs(CliState(), settings)
    assert {spec.env["MQFLEET_COLLECTOR_GROUP"] for spec in specs} == {"fleet-ingest"}
    assert [spec.name for spec in specs] == ["mqfleet-collector-1", "mqfleet-collector-2"]


# -- refused before anything starts ----------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--workers", "0"], {}, "invalid setting collector_workers: Expected `int` >= 1"),
        (["--workers", "65"], {}, "invalid setting collector_workers: Expected `int` <= 64"),
        ([], {"MQFLEET_COLLECTOR_WORKERS": "many"}, "invalid setting collector_workers"),
        (["--workers", "2"], {"MQFLEET_MQTT_VERSION": "3.1.1"}, "needs mqtt_version 5"),
        (["--workers", "2"], {"MQFLEET_COLLECTOR_ID": "dc/1"}, "set collector_group"),
    ],
)
def test_bad_worker_settings_are_one_line_and_exit_2(
    invoke, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = invoke("--broker", "mqtt://127.0.0.1:1", "collector", *args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("mqfleet: error: ")
    assert message in result.stderr


def test_the_supervisor_never_imports_the_collector_or_the_database_layer() -> None:
    # It only watches processes: it stays a small process next to its N workers.
    code = """
        import sys
        import mqfleet.cli.workers as workers
        from mqfleet.cli import cli
        seen = {}
        def fake_serve(entry, settings):
            seen["heavy"] = [m for m in ("sqlalchemy", "sqlmodel", "paho", "aiomqtt",
                                         "mqfleet.collector") if m in sys.modules]
        workers.serve = fake_serve
        workers._migrate = lambda state, settings: 0
        try:
            cli.main(["--broker", "mqtt://127.0.0.1:1", "collector", "--workers", "2"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print(seen)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.strip() == "{'heavy': []}", done.stderr
