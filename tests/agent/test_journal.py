"""The command journal and the result outbox on disk."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec
import pytest

from mqfleet.agent.journal import CommandJournal, JournalEntry, ResultOutbox
from mqfleet.errors import AgentStateError
from mqfleet.protocol import CommandRequest, utc_now

if TYPE_CHECKING:
    from pathlib import Path


def request(command_id: str, expires_at: datetime) -> CommandRequest:
    return CommandRequest(
        command_id=command_id,
        node_id="n1",
        command_text="echo hi",
        timeout_s=5,
        created_at=utc_now(),
        expires_at=expires_at,
        issuer="test",
    )


def entry(
    command_id: str,
    state: str = "accepted",
    *,
    expires_in: timedelta = timedelta(minutes=5),
    accepted_at: datetime | None = None,
) -> JournalEntry:
    expires_at = utc_now() + expires_in
    return JournalEntry(
        command_id=command_id,
        state=state,  # type: ignore[arg-type]
        expires_at=expires_at,
        accepted_at=accepted_at or utc_now(),
        request=request(command_id, expires_at) if state == "accepted" else None,
    )


# -- journal -------------------------------------------------------------------------


def test_accepted_ids_survive_a_reopen(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal")
    first = entry("c-1")
    journal.record(first)
    journal.record(entry("c-2", "running"))
    reopened = CommandJournal(tmp_path / "journal")
    assert "c-1" in reopened
    assert "c-2" in reopened
    assert "c-3" not in reopened
    assert reopened.get("c-1") == first
    assert reopened.get("c-1").request.command_text == "echo hi"  # type: ignore[union-attr]


def test_state_changes_replace_the_entry(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal")
    journal.record(entry("c-1"))
    journal.record(entry("c-1", "done"))
    reopened = CommandJournal(tmp_path / "journal")
    assert len(reopened) == 1
    assert reopened.get("c-1").state == "done"  # type: ignore[union-attr]


def test_entries_come_in_acceptance_order(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal")
    now = utc_now()
    for index, command_id in enumerate(["zz", "aa", "mm"]):
        journal.record(entry(command_id, accepted_at=now + timedelta(seconds=index)))
    reopened = CommandJournal(tmp_path / "journal")
    assert [e.command_id for e in reopened.entries()] == ["zz", "aa", "mm"]


def test_prune_forgets_only_finished_expired_ids(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal", keep_after_expiry=timedelta(0))
    journal.record(entry("done-expired", "done", expires_in=timedelta(seconds=-1)))
    journal.record(entry("done-live", "done"))
    journal.record(entry("running-expired", "running", expires_in=timedelta(seconds=-1)))
    journal.record(entry("accepted-expired", "accepted", expires_in=timedelta(seconds=-1)))
    assert journal.prune(utc_now()) == 1
    assert "done-expired" not in journal
    assert not (tmp_path / "journal" / "done-expired.json").exists()
    reopened = CommandJournal(tmp_path / "journal")
    assert {e.command_id for e in reopened.entries()} == {
        "done-live",
        "running-expired",
        "accepted-expired",
    }


def test_prune_keeps_ids_for_a_grace_period_after_expiry(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal", keep_after_expiry=timedelta(hours=1))
    journal.record(entry("recent", "done", expires_in=timedelta(minutes=-5)))
    journal.record(entry("old", "done", expires_in=timedelta(hours=-2)))
    assert journal.prune(utc_now()) == 1
    assert "recent" in journal
    assert "old" not in journal


def test_a_partially_written_temp_file_is_ignored_and_removed(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "journal")
    journal.record(entry("c-1"))
    # What a crash in the middle of record() leaves: a temp file, never renamed.
    torn = tmp_path / "journal" / ".c-2.json.tmp"
    torn.write_bytes(msgspec.json.encode(entry("c-2"))[:40])
    reopened = CommandJournal(tmp_path / "journal")
    assert "c-2" not in reopened
    assert "c-1" in reopened
    assert not torn.exists()


def test_entries_written_before_msgspec_still_load(tmp_path: Path) -> None:
    # What the pydantic JournalEntry wrote (mqfleet 0.1.0): every None as null, inside the
    # request too. An upgraded agent must still know these ids.
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    (directory / "c1.json").write_bytes(
        b'{"command_id":"c1","state":"accepted","expires_at":"2024-05-01T12:00:00Z",'
        b'"accepted_at":"2024-05-01T12:00:00Z","started_at":null,"request":{"v":1,'
        b'"command_id":"c1","node_id":"n","command_text":"x","timeout_s":60.0,'
        b'"created_at":"2024-05-01T12:00:00Z","expires_at":"2024-05-01T12:00:00Z",'
        b'"issuer":"a","batch_id":null,"signature":null}}'
    )
    loaded = CommandJournal(directory).get("c1")
    assert loaded is not None
    assert loaded.request is not None
    assert (loaded.state, loaded.request.command_text, loaded.request.signature) == (
        "accepted",
        "x",
        None,
    )


@pytest.mark.parametrize(
    "bad",
    [
        # An accepted entry needs its request.
        (
            b'{"command_id":"c1","state":"accepted","expires_at":"2024-05-01T12:00:00Z",'
            b'"accepted_at":"2024-05-01T12:00:00Z"}'
        ),
        # A naive time.
        (
            b'{"command_id":"c1","state":"done","expires_at":"2024-05-01T12:00:00",'
            b'"accepted_at":"2024-05-01T12:00:00Z"}'
        ),
        (
            b'{"command_id":"c1","state":"done","expires_at":"2024-05-01T12:00:00Z",'
            b'"accepted_at":"2024-05-01T12:00:00Z","extra":1}'
        ),
    ],
    ids=["no-request", "naive", "unknown-field"],
)
def test_an_invalid_entry_is_set_aside(tmp_path: Path, bad: bytes) -> None:
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    (directory / "c1.json").write_bytes(bad)
    assert "c1" not in CommandJournal(directory)
    assert (directory / "c1.json.corrupt").exists()


def test_naive_times_are_refused_from_python_too() -> None:
    with pytest.raises(ValueError, match="expires_at must carry a UTC offset"):
        JournalEntry(
            command_id="c1",
            state="done",
            expires_at=datetime(2024, 5, 1, 12, 0),  # noqa: DTZ001 - the point of the test
            accepted_at=utc_now(),
        )


def test_a_corrupt_entry_is_set_aside_without_stopping_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = CommandJournal(tmp_path / "journal")
    journal.record(entry("good"))
    (tmp_path / "journal" / "bad.json").write_bytes(b'{"command_id": "bad", "sta')
    reopened = CommandJournal(tmp_path / "journal")
    assert "good" in reopened
    assert "bad" not in reopened
    assert (tmp_path / "journal" / "bad.json.corrupt").exists()
    assert "bad.json" in caplog.text


def test_an_unusable_directory_is_an_agent_state_error(tmp_path: Path) -> None:
    (tmp_path / "journal").write_text("a file, not a directory")
    with pytest.raises(AgentStateError, match="cannot use state directory"):
        CommandJournal(tmp_path / "journal")


def test_the_directory_is_private(tmp_path: Path) -> None:
    CommandJournal(tmp_path / "state" / "journal")
    assert (tmp_path / "state" / "journal").stat().st_mode & 0o777 == 0o700


# -- outbox --------------------------------------------------------------------------


def drain(outbox: ResultOutbox) -> list[tuple[str, bytes]]:
    sent = []
    while (item := outbox.peek()) is not None:
        sent.append((item.command_id, item.payload))
        outbox.remove(item)
    return sent


def test_outbox_delivers_in_order_and_forgets_acknowledged_items(tmp_path: Path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    outbox.put("c-1", b"running 1")
    outbox.put("c-2", b"running 2")
    outbox.put("c-1", b"final 1")
    assert len(outbox) == 3
    assert drain(outbox) == [("c-1", b"running 1"), ("c-2", b"running 2"), ("c-1", b"final 1")]
    assert len(outbox) == 0
    assert list((tmp_path / "outbox").iterdir()) == []


def test_outbox_survives_a_reopen_in_order(tmp_path: Path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    for index in range(12):  # more than 9: order must not be lexical on short numbers
        outbox.put(f"c-{index}", f"payload {index}".encode())
    first = outbox.peek()
    assert first is not None
    outbox.remove(first)
    reopened = ResultOutbox(tmp_path / "outbox")
    reopened.put("c-new", b"after the restart")
    sent = drain(reopened)
    assert [command_id for command_id, _ in sent] == [f"c-{i}" for i in range(1, 12)] + ["c-new"]


def test_unacknowledged_item_stays_first(tmp_path: Path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    outbox.put("c-1", b"one")
    outbox.put("c-2", b"two")
    item = outbox.peek()
    assert item is not None
    # publish() raised: nothing is removed, the same item comes first again.
    again = ResultOutbox(tmp_path / "outbox").peek()
    assert again is not None
    assert (again.command_id, again.payload) == ("c-1", b"one")


def test_outbox_ignores_a_torn_temp_file(tmp_path: Path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    outbox.put("c-1", b"one")
    torn = tmp_path / "outbox" / ".00000000000000000002-c-2.json.tmp"
    torn.write_bytes(b'{"v":1,"comm')
    reopened = ResultOutbox(tmp_path / "outbox")
    assert drain(reopened) == [("c-1", b"one")]
    assert not torn.exists()


def test_outbox_skips_an_item_that_vanished(tmp_path: Path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    outbox.put("c-1", b"one")
    outbox.put("c-2", b"two")
    for path in (tmp_path / "outbox").glob("*c-1.json"):
        path.unlink()
    assert drain(outbox) == [("c-2", b"two")]


def test_outbox_items_in_flight_are_peeked_past_and_removed_out_of_line(tmp_path: Path) -> None:
    # Delivery keeps several results on the wire: it asks for the next one after the
    # last it sent, and a PUBACK may remove an item that is not first in line.
    outbox = ResultOutbox(tmp_path / "outbox")
    first = outbox.put("c-1", b"one")
    second = outbox.put("c-2", b"two")
    outbox.put("c-3", b"three")
    assert (first.command_id, first.payload) == ("c-1", b"one")
    after = outbox.peek_after(first.seq)
    assert after is not None
    assert (after.seq, after.payload) == (second.seq, b"two")
    outbox.remove(after)
    assert [c for c, _ in drain(outbox)] == ["c-1", "c-3"]
    assert outbox.peek_after(0) is None


@pytest.mark.parametrize("durable", [True, False])
def test_durable_writes_fsync_and_the_others_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, durable: bool
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    journal = CommandJournal(tmp_path / "journal")
    outbox = ResultOutbox(tmp_path / "outbox")
    journal.record(entry("c-1"), durable=durable)
    outbox.put("c-1", b"one", durable=durable)
    # File and directory, for each of the two writes; none without durable.
    assert len(synced) == (4 if durable else 0)
    # Either way the data is in place for the next process (an agent crash loses nothing).
    assert "c-1" in CommandJournal(tmp_path / "journal")
    assert drain(ResultOutbox(tmp_path / "outbox")) == [("c-1", b"one")]
