from __future__ import annotations

import os
import stat

import pytest

from mqfleet.agent.state import SessionCounter, ensure_state_dir
from mqfleet.errors import AgentStateError


def test_sessions_strictly_increase_across_restarts(tmp_path):
    state_dir = tmp_path / "state" / "node"
    first = SessionCounter(state_dir)
    assert first.current() == 0
    assert [first.allocate() for _ in range(3)] == [1, 2, 3]
    # A restarted agent is a new SessionCounter over the same directory.
    again = SessionCounter(state_dir)
    assert again.current() == 3
    assert again.allocate() == 4
    assert (state_dir / "session").read_text() == "4\n"


def test_state_dir_is_created_private(tmp_path):
    state_dir = tmp_path / "a" / "b"
    SessionCounter(state_dir).allocate()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "session").stat().st_mode) == 0o600


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    counter = SessionCounter(tmp_path)
    counter.allocate()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(AgentStateError, match="cannot write session file"):
        counter.allocate()
    monkeypatch.undo()
    # The old value is intact and no half-written file is left behind.
    assert counter.current() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session", "session.lock"]
    assert counter.allocate() == 2


@pytest.mark.parametrize("content", [b"", b"abc\n", b"-3\n", b"1.5", b"\xff\xfe", b"9" * 100])
def test_corrupt_file_is_a_one_line_error(tmp_path, content):
    (tmp_path / "session").write_bytes(content)
    counter = SessionCounter(tmp_path)
    with pytest.raises(AgentStateError, match="is corrupt") as info:
        counter.allocate()
    assert "\n" not in str(info.value)
    # Never silently restarted from 1: the file is left for the operator.
    assert (tmp_path / "session").read_bytes() == content


def test_unreadable_file_is_a_one_line_error(tmp_path):
    (tmp_path / "session").mkdir()  # reading a directory fails with EISDIR
    with pytest.raises(AgentStateError, match="cannot read session file") as info:
        SessionCounter(tmp_path).current()
    assert "\n" not in str(info.value)


def test_state_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AgentStateError, match="cannot create agent state dir"):
        ensure_state_dir(blocker / "state")


def test_advance_past_a_session_seen_elsewhere(tmp_path):
    counter = SessionCounter(tmp_path)
    counter.allocate()
    counter.advance_past(41)
    assert counter.allocate() == 42
    counter.advance_past(10)  # never backwards
    assert counter.allocate() == 43
