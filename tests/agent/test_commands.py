"""The agent's command service with a fake publish: exactly once, restarts, outbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mqfleet.agent.commands import (
    AGENT_RESTARTED,
    EXPIRED_BEFORE_DELIVERY,
    EXPIRED_BEFORE_START,
    CommandService,
)
from mqfleet.agent.service import warn_about_exposed_files
from mqfleet.errors import ConfigError
from mqfleet.protocol import (
    MAX_PAYLOAD_BYTES,
    CommandFinished,
    CommandRequest,
    CommandStarted,
    decode_command,
    decode_result,
    encode,
    utc_now,
)
from mqfleet.security import sign_command
from mqfleet.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from mqfleet.settings import Settings

NODE = "n1"
#: The operator key every command of this module is signed with (tests/security covers
#: the unsigned, forged and altered ones).
KEY = Ed25519PrivateKey.generate()


@pytest.fixture(autouse=True)
def _agents_trust_the_test_key(trusted_key: Callable[[Ed25519PrivateKey], object]) -> None:
    trusted_key(KEY)


def command(
    command_id: str,
    text: str,
    *,
    node_id: str = NODE,
    timeout_s: float = 30,
    expires_in: timedelta = timedelta(minutes=5),
) -> bytes:
    now = utc_now()
    request = CommandRequest(
        command_id=command_id,
        node_id=node_id,
        command_text=text,
        timeout_s=timeout_s,
        created_at=now,
        expires_at=now + expires_in,
        issuer="test",
    )
    return encode(sign_command(request, KEY))


class FakePublisher:
    """Records what was published; raises after ``fail_after`` publishes (a disconnect)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail_after = fail_after

    async def __call__(self, topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)  # a real publish awaits the PUBACK
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker went away")
        self.sent.append((topic, payload))

    def results(self) -> list[CommandStarted | CommandFinished]:
        return [decode_result(payload) for _, payload in self.sent]

    def final(self, command_id: str) -> CommandFinished | None:
        for result in self.results():
            if isinstance(result, CommandFinished) and result.command_id == command_id:
                return result
        return None

    def statuses(self) -> list[tuple[str, str]]:
        return [(r.command_id, r.status) for r in self.results()]


async def wait_until(predicate: Callable[[], Any]) -> None:
    async with asyncio.timeout(20):  # generous: the machine is shared and noisy
        while not predicate():  # noqa: ASYNC110 - polls files and other processes
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(
    service: CommandService, publish: FakePublisher | None = None
) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(service.run_loop())]
    if publish is not None:
        tasks.append(asyncio.create_task(service.deliver_loop(publish)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(node_id=NODE, kill_grace_s=0.2, max_concurrent_commands=4)


async def started(settings: Settings) -> CommandService:
    service = CommandService(settings)
    await service.start()
    return service


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_command_reports_running_then_its_result(settings: Settings) -> None:
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", "echo hello; echo oops >&2; exit 4"))
        await wait_until(lambda: publish.final("c-1"))
    assert [topic for topic, _ in publish.sent] == [f"fleet/v1/nodes/{NODE}/results/c-1"] * 2
    running, final = publish.results()
    assert isinstance(running, CommandStarted)
    assert isinstance(final, CommandFinished)
    assert final.status == "failed"
    assert final.exit_code == 4
    assert final.stdout == "hello\n"
    assert final.stderr == "oops\n"
    assert final.node_id == NODE
    assert final.started_at == running.started_at
    assert not final.stdout_truncated


async def test_the_command_knows_its_id(settings: Settings) -> None:
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", 'echo "$MQFLEET_COMMAND_ID on $MQFLEET_NODE_ID"'))
        await wait_until(lambda: publish.final("c-1"))
    assert publish.final("c-1").stdout == f"c-1 on {NODE}\n"  # type: ignore[union-attr]


async def test_a_duplicate_payload_runs_once(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    payload = command("c-1", f"echo run >> {log}")
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(payload)
        service.accept(payload)  # QoS 1 redelivery while queued
        await wait_until(lambda: publish.final("c-1"))
        service.accept(payload)  # the collector redelivers after it finished
        service.accept(command("c-2", "true"))  # something after it, to know it was seen
        await wait_until(lambda: publish.final("c-2"))
    assert lines(log) == ["run"]
    assert publish.statuses() == [
        ("c-1", "running"),
        ("c-1", "success"),
        ("c-2", "running"),
        ("c-2", "success"),
    ]


async def test_a_duplicate_after_a_restart_is_ignored(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    payload = command("c-1", f"echo run >> {log}")
    first, publish = await started(settings), FakePublisher()
    async with serving(first, publish):
        first.accept(payload)
        await wait_until(lambda: publish.final("c-1"))
    second, publish = await started(settings), FakePublisher()
    async with serving(second, publish):
        second.accept(payload)
        second.accept(command("c-2", "true"))
        await wait_until(lambda: publish.final("c-2"))
    assert lines(log) == ["run"]
    assert publish.statuses() == [("c-2", "running"), ("c-2", "success")]


async def test_an_expired_command_is_never_run(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", f"touch {marker}", expires_in=timedelta(seconds=-1)))
        await wait_until(lambda: publish.final("c-1"))
        service.accept(command("c-2", "true"))
        await wait_until(lambda: publish.final("c-2"))
    final = publish.final("c-1")
    assert final is not None
    assert final.status == "timeout"
    assert final.error == EXPIRED_BEFORE_DELIVERY
    assert final.started_at is None
    assert ("c-1", "running") not in publish.statuses()
    assert not marker.exists()


async def test_a_command_that_expires_while_queued_is_not_run_late(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(node_id=NODE, kill_grace_s=0.2, max_concurrent_commands=1)
    gate, marker = tmp_path / "gate", tmp_path / "ran"
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", f"while [ ! -e {gate} ]; do sleep 0.02; done"))
        late = command("c-2", f"touch {marker}", expires_in=timedelta(seconds=2))
        expires_at = decode_command(late).expires_at
        service.accept(late)
        await wait_until(lambda: utc_now() > expires_at)
        gate.touch()
        await wait_until(lambda: publish.final("c-2"))
    final = publish.final("c-2")
    assert final is not None
    assert final.status == "timeout"
    assert final.error == EXPIRED_BEFORE_START
    assert not marker.exists()


async def test_a_command_for_another_node_is_refused(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", f"touch {marker}", node_id="elsewhere"))
        await wait_until(lambda: publish.final("c-1"))
    ((topic, _),) = publish.sent
    final = publish.final("c-1")
    assert final is not None
    assert topic == f"fleet/v1/nodes/{NODE}/results/c-1"
    assert final.status == "failed"
    assert "refused" in (final.error or "")
    assert "elsewhere" in (final.error or "")
    assert final.node_id == NODE
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b'{"v": 1}',
        b'{"v": 2, "command_id": "c-9"}',
        b"\xff\xfe\x00 binary",
        b'{"v":1,"command_id":"' + b"x" * 400_000 + b'"}',
    ],
    ids=["garbage", "missing-fields", "wrong-version", "binary", "oversized"],
)
async def test_bad_payloads_are_logged_and_dropped(
    settings: Settings, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(payload)  # must not raise
        service.accept(command("c-ok", "true"))
        await wait_until(lambda: publish.final("c-ok"))
    assert publish.statuses() == [("c-ok", "running"), ("c-ok", "success")]
    (warning,) = [r for r in caplog.records if "dropping command payload" in r.getMessage()]
    assert len(warning.getMessage()) < 2000  # the payload is truncated in the log


async def test_a_timeout_is_reported_as_timeout(settings: Settings) -> None:
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", "echo before; sleep 300", timeout_s=0.5))
        await wait_until(lambda: publish.final("c-1"))
    final = publish.final("c-1")
    assert final is not None
    assert final.status == "timeout"
    assert final.exit_code is None
    assert final.stdout == "before\n"
    assert "timed out after 0.5 s" in (final.error or "")


async def test_at_most_n_run_at_once_and_they_start_in_arrival_order(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(node_id=NODE, kill_grace_s=0.2, max_concurrent_commands=2)
    log = tmp_path / "log"
    script = (
        f'echo "start $MQFLEET_COMMAND_ID" >> {log};'
        f" while [ ! -e {tmp_path}/gate-$MQFLEET_COMMAND_ID ]; do sleep 0.02; done;"
        f' echo "end $MQFLEET_COMMAND_ID" >> {log}'
    )
    ids = [f"c-{i}" for i in range(1, 6)]
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        for command_id in ids:
            service.accept(command(command_id, script))
        await wait_until(lambda: len(lines(log)) == 2)
        await asyncio.sleep(0.3)  # a third start would show up here
        assert sorted(lines(log)) == ["start c-1", "start c-2"]
        # Finish them out of order: the queue still starts c-3, c-4, c-5 in turn.
        for release, expect in [("c-2", "c-3"), ("c-1", "c-4"), ("c-4", "c-5")]:
            (tmp_path / f"gate-{release}").touch()
            await wait_until(lambda expect=expect: f"start {expect}" in lines(log))
        for command_id in ["c-3", "c-5"]:
            (tmp_path / f"gate-{command_id}").touch()
        await wait_until(lambda: all(publish.final(c) for c in ids))
    events = lines(log)
    assert [e.split()[1] for e in events if e.startswith("start")] == ids
    running = peak = 0
    for event in events:
        running += 1 if event.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2


async def test_a_command_running_at_a_crash_is_reported_and_never_rerun(
    settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    payload = command("c-1", f"echo run >> {log}; sleep 300")
    first = await started(settings)
    async with serving(first):  # no broker: results stay in the outbox
        first.accept(payload)
        await wait_until(lambda: lines(log) == ["run"])
    # The agent is gone (its journal still says "running"); a new process starts.
    second, publish = await started(settings), FakePublisher()
    async with serving(second, publish):
        await wait_until(lambda: publish.final("c-1"))
        second.accept(payload)  # a redelivery after the restart
        second.accept(command("c-2", "true"))
        await wait_until(lambda: publish.final("c-2"))
    final = publish.final("c-1")
    assert final is not None
    assert final.status == "failed"
    assert final.error == AGENT_RESTARTED
    assert final.started_at is not None
    assert publish.statuses()[:2] == [("c-1", "running"), ("c-1", "failed")]
    assert lines(log) == ["run"]


async def test_accepted_commands_that_never_started_run_after_a_restart(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(node_id=NODE, kill_grace_s=0.2, max_concurrent_commands=1)
    log = tmp_path / "runs"
    first = await started(settings)
    async with serving(first):
        first.accept(command("c-1", f"echo c-1 >> {log}; sleep 300"))
        first.accept(command("c-2", f"echo c-2 >> {log}"))  # waits for the only slot
        await wait_until(lambda: lines(log) == ["c-1"])
    second, publish = await started(settings), FakePublisher()
    async with serving(second, publish):
        await wait_until(lambda: publish.final("c-2"))
    assert publish.final("c-1").error == AGENT_RESTARTED  # type: ignore[union-attr]
    assert publish.final("c-2").status == "success"  # type: ignore[union-attr]
    assert lines(log) == ["c-1", "c-2"]


async def test_results_survive_a_restart_and_a_disconnect_in_order(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(node_id=NODE, kill_grace_s=0.2, max_concurrent_commands=1)
    first = await started(settings)
    async with serving(first):  # the broker is down the whole time
        for index in range(1, 4):
            first.accept(command(f"c-{index}", f"echo {index}"))
        await wait_until(lambda: len(first._outbox or ()) == 6)
    second = await started(settings)
    cut = FakePublisher(fail_after=2)
    with pytest.raises(ConnectionError):
        await second.deliver_loop(cut)  # returns control to the caller, which reconnects
    rest = FakePublisher()
    async with serving(second, rest):
        await wait_until(lambda: len(rest.sent) == 4)
    expected = [(f"c-{i}", status) for i in range(1, 4) for status in ("running", "success")]
    assert cut.statuses() + rest.statuses() == expected
    assert [r.stdout for r in rest.results() if isinstance(r, CommandFinished)] == ["2\n", "3\n"]
    assert len(second._outbox or ()) == 0
    outbox_dir = settings.agent_state_dir / "commands" / "outbox"
    assert list(outbox_dir.iterdir()) == []


async def test_huge_outputs_still_fit_the_result_payload_limit(
    make_settings: Callable[..., Settings],
) -> None:
    # NUL bytes grow six-fold in JSON (\u0000): 1 MiB per stream cannot fit as it is.
    settings = make_settings(node_id=NODE, output_limit_bytes=1024 * 1024)
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2"))
        await wait_until(lambda: publish.final("c-1"))
    _, payload = publish.sent[-1]
    assert len(payload) <= MAX_PAYLOAD_BYTES["result"]
    final = publish.final("c-1")
    assert final is not None
    assert final.status == "success"
    assert final.stdout_truncated
    assert final.stderr_truncated
    assert "bytes truncated] ..." in final.stdout


async def test_accept_before_start_is_a_programming_error(settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="start"):
        CommandService(settings).accept(command("c-1", "true"))


NOBODY_HOME_EXISTS = Path(pwd.getpwnam("nobody").pw_dir).is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
async def test_run_as_user_runs_commands_as_that_user(
    make_settings: Callable[..., Settings],
) -> None:
    nobody = pwd.getpwnam("nobody")
    settings = make_settings(node_id=NODE, run_as_user="nobody")
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", 'id -u; id -g; echo "$USER $HOME"; pwd'))
        await wait_until(lambda: publish.final("c-1"))
    final = publish.final("c-1")
    assert final is not None
    home = nobody.pw_dir if NOBODY_HOME_EXISTS else "/"
    assert final.stdout.splitlines() == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        f"nobody {nobody.pw_dir}",
        home,
    ]


def test_run_as_user_is_refused_clearly_when_the_agent_is_not_root(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mqfleet.agent.commands.os.geteuid", lambda: 4242)
    settings = make_settings(node_id=NODE, run_as_user="nobody")
    with pytest.raises(ConfigError, match=r"run_as_user 'nobody' needs the agent to run as root"):
        CommandService(settings)
    with pytest.raises(ConfigError, match="no such user"):
        CommandService(make_settings(node_id=NODE, run_as_user="no-such-user-here"))


def test_a_missing_public_key_file_is_a_one_line_config_error(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(node_id=NODE, operator_public_key_file=tmp_path / "absent.pub")
    with pytest.raises(ConfigError, match=r"cannot read operator public key .*absent\.pub"):
        CommandService(settings)


def test_exposed_config_and_writable_key_files_are_warned_about(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'node_id = "{NODE}"\n')
    config.chmod(0o644)
    settings = load_settings(config_file=config)
    assert settings.operator_public_key_file is not None
    settings.operator_public_key_file.chmod(0o666)
    warn_about_exposed_files(settings)
    assert f"run: chmod 600 {config}" in caplog.text
    assert f"run: chmod 644 {settings.operator_public_key_file}" in caplog.text
    caplog.clear()
    config.chmod(0o600)
    settings.operator_public_key_file.chmod(0o644)
    warn_about_exposed_files(settings)
    assert caplog.text == ""


async def test_running_is_fsynced_before_the_spawn_and_is_the_only_fsync(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The durability choice of agent.commands: one fsync'd write per command ("running",
    # before the shell starts); the rest survive an agent crash without fsync.
    ran = tmp_path / "ran"
    seen_at_fsync: list[bool] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (seen_at_fsync.append(ran.exists()), real_fsync(fd))[1]
    )
    service, publish = await started(settings), FakePublisher()
    async with serving(service, publish):
        service.accept(command("c-1", f"touch {ran}"))
        await wait_until(lambda: publish.final("c-1"))
    assert publish.statuses() == [("c-1", "running"), ("c-1", "success")]
    assert seen_at_fsync == [False, False]  # the journal file and its directory


async def test_done_is_journaled_only_once_the_final_result_is_acknowledged(
    settings: Settings,
) -> None:
    service = await started(settings)
    journal = service._journal
    assert journal is not None
    async with serving(service):  # no broker: the results wait in the outbox
        service.accept(command("c-1", "true"))
        await wait_until(lambda: len(service._outbox or ()) == 2)
        await asyncio.sleep(0.1)
        entry = journal.get("c-1")
        assert entry is not None
        assert entry.state == "running"
    publish = FakePublisher()
    async with serving(service, publish):
        await wait_until(lambda: publish.final("c-1"))
        await wait_until(lambda: getattr(journal.get("c-1"), "state", None) == "done")


async def test_a_restart_sends_a_finished_commands_result_instead_of_agent_restarted(
    settings: Settings,
) -> None:
    first = await started(settings)
    async with serving(first):  # finished, but the broker never acknowledged the result
        first.accept(command("c-1", "echo hi"))
        await wait_until(lambda: len(first._outbox or ()) == 2)
    second, publish = await started(settings), FakePublisher()
    async with serving(second, publish):
        await wait_until(lambda: publish.final("c-1"))
        await asyncio.sleep(0.2)  # an "agent restarted" report would show up here
    assert publish.statuses() == [("c-1", "running"), ("c-1", "success")]
    assert publish.final("c-1").stdout == "hi\n"  # type: ignore[union-attr]


async def test_a_torn_result_file_after_a_power_loss_is_set_aside_and_reported(
    settings: Settings,
) -> None:
    # Results are not fsync'd: after a power loss a final result may be a torn file.
    first = await started(settings)
    async with serving(first):
        first.accept(command("c-1", "echo hi"))
        await wait_until(lambda: len(first._outbox or ()) == 2)
    outbox_dir = settings.agent_state_dir / "commands" / "outbox"
    final_file = max(outbox_dir.glob("*.json"))
    final_file.write_bytes(b'{"v":1,"command_id":"c-1","sta')
    second, publish = await started(settings), FakePublisher()
    async with serving(second, publish):
        await wait_until(lambda: publish.final("c-1"))
    assert publish.statuses() == [("c-1", "running"), ("c-1", "failed")]
    assert publish.final("c-1").error == AGENT_RESTARTED  # type: ignore[union-attr]
    assert final_file.with_name(final_file.name + ".corrupt").exists()
