"""The command executor: statuses, process-group kill, output capture, environment."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import psutil
import pytest

from mqfleet.agent.executor import STANDARD_PATH, CapturedOutput, CommandExecutor

if TYPE_CHECKING:
    from pathlib import Path

LIMIT = 64 * 1024


def executor(limit: int = LIMIT, grace: float = 0.2) -> CommandExecutor:
    return CommandExecutor(output_limit_bytes=limit, kill_grace_s=grace)


def is_gone(pid: int) -> bool:
    """A process is gone when it no longer exists or is a zombie waiting for init.

    This machine's PID 1 does not reap orphans, so a killed grandchild stays a zombie
    here; a zombie runs nothing and holds nothing but its pid.
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_session_members(sid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


async def wait_until(predicate) -> None:
    async with asyncio.timeout(15):  # generous: the machine is shared and noisy
        while not predicate():  # noqa: ASYNC110 - polls other processes: no event to await
            await asyncio.sleep(0.02)


async def test_success_captures_both_streams() -> None:
    result = await executor().run("echo out; echo err >&2", timeout_s=10)
    assert result.status == "success"
    assert result.exit_code == 0
    assert result.error is None
    assert result.stdout.text == "out\n"
    assert result.stderr.text == "err\n"
    assert not result.stdout.truncated()
    assert result.started_at is not None
    assert result.started_at <= result.completed_at
    assert result.execution_time_ms >= 0


async def test_non_zero_exit_is_failed_with_its_code() -> None:
    result = await executor().run("echo partial; exit 3", timeout_s=10)
    assert result.status == "failed"
    assert result.exit_code == 3
    assert result.stdout.text == "partial\n"


async def test_command_not_found_is_failed_127_with_a_hint() -> None:
    result = await executor().run("no-such-command-xyz", timeout_s=10)
    assert result.status == "failed"
    assert result.exit_code == 127
    assert "not find" in (result.error or "")
    assert "not found" in result.stderr.text


async def test_killed_by_a_signal_reports_the_shell_convention() -> None:
    result = await executor().run("kill -9 $$", timeout_s=10)
    assert result.status == "failed"
    assert result.exit_code == 137
    assert result.error == "terminated by signal SIGKILL"


async def test_command_that_cannot_start_is_failed_without_start_time() -> None:
    result = await executor().run("echo a\0b", timeout_s=10)
    assert result.status == "failed"
    assert result.started_at is None
    assert result.exit_code is None
    assert "could not start" in (result.error or "")


async def test_stdin_is_dev_null_so_prompts_fail_fast() -> None:
    result = await executor().run('read answer; echo "read=$?"', timeout_s=30)
    assert result.status == "success"
    assert result.stdout.text == "read=1\n"


async def test_timeout_kills_the_whole_process_tree() -> None:
    result = await executor(grace=0.2).run("echo $$; sleep 300 & echo $!; sleep 300", timeout_s=0.5)
    assert result.status == "timeout"
    assert result.exit_code is None
    assert "timed out after 0.5 s" in (result.error or "")
    shell_pid, grandchild_pid = (int(line) for line in result.stdout.text.split())
    assert is_gone(shell_pid)
    assert is_gone(grandchild_pid)
    assert live_session_members(shell_pid) == []


async def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    # An ignored signal stays ignored across fork and exec: every process ignores TERM.
    result = await executor(grace=0.2).run(
        "trap '' TERM; echo $$; sleep 300 & echo $!; sleep 300", timeout_s=0.5
    )
    assert result.status == "timeout"
    assert "SIGKILL" in (result.error or "")
    shell_pid, grandchild_pid = (int(line) for line in result.stdout.text.split())
    assert is_gone(shell_pid)
    assert is_gone(grandchild_pid)
    assert live_session_members(shell_pid) == []


async def test_background_leftovers_do_not_outlive_the_command() -> None:
    # The grandchild keeps stdout open: the result must not wait for its 300 s.
    result = await executor(grace=0.2).run("echo $$; sleep 300 & echo $!", timeout_s=30)
    assert result.status == "success"
    shell_pid, grandchild_pid = (int(line) for line in result.stdout.text.split())
    assert is_gone(grandchild_pid)
    assert live_session_members(shell_pid) == []


async def test_escaped_process_holding_the_pipes_cannot_stall_the_result(tmp_path: Path) -> None:
    # setsid leaves the process group on purpose: it is not killed, only no longer read.
    pid_file = tmp_path / "pid"
    # The command waits for the pid file so the process has left the group when it ends.
    result = await executor().run(
        f"setsid sh -c 'echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 300' &"
        f" while [ ! -e {pid_file} ]; do sleep 0.01; done; echo done",
        timeout_s=30,
    )
    try:
        assert result.status == "success"
        assert result.stdout.text.startswith("done\n")
    finally:
        await wait_until(pid_file.exists)
        psutil.Process(int(pid_file.read_text())).kill()


async def test_ten_megabytes_of_output_are_truncated_to_head_and_tail() -> None:
    size = 10 * 1024 * 1024
    produce = f"head -c {size} /dev/zero | tr '\\0' x"
    result = await executor(LIMIT).run(
        f"printf HEAD; {produce}; printf TAIL; ({produce}) >&2", timeout_s=120
    )
    assert result.status == "success"
    text = result.stdout.text
    dropped = size + 8 - LIMIT
    assert text.startswith("HEADxxx")
    assert text.endswith("xxxTAIL")
    assert f"\n... [{dropped} bytes truncated] ...\n" in text
    head, _, tail = text.partition(f"\n... [{dropped} bytes truncated] ...\n")
    assert len(head) + len(tail) == LIMIT
    assert result.stdout.truncated()
    assert result.stdout.total == size + 8
    assert result.stderr.truncated()
    assert result.stderr.total == size


async def test_invalid_utf8_becomes_replacement_characters() -> None:
    result = await executor().run(r"printf 'ok \377\376 caf\303\251\n'", timeout_s=10)
    assert result.status == "success"
    assert result.stdout.text == "ok \ufffd\ufffd caf\u00e9\n"


async def test_environment_is_documented_and_not_inherited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENT_SECRET", "hunter2")
    result = await executor().run("env", timeout_s=10, extra_env={"MQFLEET_COMMAND_ID": "c-1"})
    env = dict(line.split("=", 1) for line in result.stdout.text.splitlines())
    env.pop("PWD", None)  # the shell sets it itself
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "MQFLEET_COMMAND_ID"}
    assert env["PATH"] == STANDARD_PATH
    assert env["LANG"] == "C.UTF-8"
    assert env["MQFLEET_COMMAND_ID"] == "c-1"
    assert "hunter2" not in result.stdout.text


async def test_cancellation_kills_the_running_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    task = asyncio.create_task(
        executor().run(f"sleep 300 & echo $$ $! > {pid_file}; wait", timeout_s=300)
    )
    await wait_until(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    shell_pid, grandchild_pid = (int(p) for p in pid_file.read_text().split())
    await wait_until(lambda: is_gone(shell_pid) and is_gone(grandchild_pid))


async def test_on_start_is_called_with_the_start_time() -> None:
    seen = []
    result = await executor().run("true", timeout_s=10, on_start=seen.append)
    assert seen == [result.started_at]


async def test_on_start_failure_kills_the_command_and_propagates(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def explode(_started_at: object) -> None:
        raise RuntimeError("outbox is broken")

    # Written by rename, so the file either holds the whole pid or does not exist: the
    # shell can be killed between the redirection and the write.
    with pytest.raises(RuntimeError, match="outbox is broken"):
        await executor().run(
            f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 300",
            timeout_s=300,
            on_start=explode,
        )
    if pid_file.exists():  # the shell may not have got that far
        await wait_until(lambda: is_gone(int(pid_file.read_text())))


# -- CapturedOutput ------------------------------------------------------------------


def test_capture_keeps_everything_under_the_limit() -> None:
    out = CapturedOutput(1024)
    for _ in range(8):
        out.feed(b"x" * 128)
    assert out.text == "x" * 1024
    assert not out.truncated()


def test_capture_keeps_head_and_tail_with_an_exact_count() -> None:
    out = CapturedOutput(1024)
    out.feed(b"A" * 600)
    out.feed(b"B" * 5000)
    out.feed(b"C" * 600)
    head, marker, tail = out.text.split("\n")
    assert head == "A" * 512
    assert marker == f"... [{6200 - 1024} bytes truncated] ..."
    assert tail == "C" * 512
    assert out.truncated()


def test_capture_renders_smaller_on_request() -> None:
    out = CapturedOutput(1024)
    out.feed(b"a" * 700 + b"z" * 700)
    assert out.render(256) == "a" * 128 + f"\n... [{1400 - 256} bytes truncated] ...\n" + "z" * 128
    assert out.truncated(256)
    assert out.render(4096) == out.text  # never more than was captured


def test_capture_cuts_at_character_boundaries() -> None:
    out = CapturedOutput(1024)
    out.feed("é".encode() * 2000)  # two bytes each: 511 would split one at both seams
    head, marker, tail = out.text.split("\n")
    assert "\ufffd" not in out.text
    assert set(head) == {"é"}
    assert set(tail) == {"é"}
    dropped = int(marker.split("[")[1].split()[0])
    assert len(head.encode()) + dropped + len(tail.encode()) == 4000


def test_capture_head_ending_in_newline_gets_no_blank_line() -> None:
    out = CapturedOutput(1024)
    out.feed(b"line\n" * 1000)
    assert "\n\n" not in out.text
