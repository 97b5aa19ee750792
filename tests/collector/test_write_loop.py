"""The write loop with fakes: ack only after commit, retry on transient errors."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.exc import OperationalError

from mqfleet.collector import Collector
from mqfleet.collector.writer import BatchOutcome, Inbound
from mqfleet.errors import StoreError

from .conftest import wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mqfleet.settings import Settings


@dataclass
class FakeMessage:
    mid: int
    topic: str = "fleet/v1/nodes/n1/metrics"
    payload: bytes = b"{}"
    qos: int = 1
    retain: bool = False


@dataclass
class FakeClient:
    acks: list[int] = field(default_factory=list)

    def ack(self, mid: int, qos: int) -> None:
        assert qos == 1
        self.acks.append(mid)


@dataclass
class FlakyWriter:
    """Fails the first ``failures`` commits the way a locked/restarting database does."""

    client: FakeClient
    failures: int = 1
    calls: list[tuple[int, ...]] = field(default_factory=list)
    acked_before_commit: list[int] = field(default_factory=list)

    def write_batch(self, batch: Sequence[Inbound]) -> BatchOutcome:
        self.calls.append(tuple(m.mid for m in batch))
        self.acked_before_commit.extend(m.mid for m in batch if m.mid in self.client.acks)
        if len(self.calls) <= self.failures:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return BatchOutcome(metrics=len(batch))


@contextlib.asynccontextmanager
async def write_loop(collector: Collector, writer: Any, client: FakeClient) -> Any:
    collector._loop = asyncio.get_running_loop()
    collector._writer = writer
    collector._client = client  # type: ignore[assignment]
    task = asyncio.create_task(collector._write_loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def deliver(collector: Collector, *mids: int) -> None:
    for mid in mids:
        collector._on_message(None, None, FakeMessage(mid))  # type: ignore[arg-type]


async def test_transient_db_error_retries_the_batch_and_acks_after_commit(
    make_settings: Callable[..., Settings],
) -> None:
    collector = Collector(make_settings())
    client = FakeClient()
    writer = FlakyWriter(client)
    deliver(collector, 1, 2, 3)
    async with write_loop(collector, writer, client):
        await wait_until(lambda: client.acks == [1, 2, 3], what="acks after the retry")
    assert writer.calls == [(1, 2, 3), (1, 2, 3)]
    assert writer.acked_before_commit == []
    assert collector.stats.metrics == 3


async def test_acks_never_cross_to_a_new_connection(
    make_settings: Callable[..., Settings],
) -> None:
    # Packet ids restart per connection: an ack for a message of the old connection
    # would acknowledge some other message on the new one.
    collector = Collector(make_settings())
    client = FakeClient()
    writer = FlakyWriter(client, failures=2)
    deliver(collector, 1, 2)
    async with write_loop(collector, writer, client):
        await wait_until(lambda: writer.calls, what="first attempt")
        collector._on_disconnect(None, None, None, "lost", None)  # type: ignore[arg-type]
        deliver(collector, 7)
        await wait_until(lambda: client.acks == [7], what="new connection's ack")
    assert 1 not in client.acks
    assert 2 not in client.acks


async def test_unreachable_database_is_a_one_line_store_error(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError) as info:
        await Collector(settings).run()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot reach database postgresql+psycopg://nobody@127.0.0.1:1/none")


async def test_messages_after_idle_spells_wake_the_writer(
    make_settings: Callable[..., Settings],
) -> None:
    # paho's thread appends without a lock; the writer, finding nothing, raises an idle
    # flag that the next message must see, or it would sit unwritten and unacked.
    collector = Collector(make_settings())
    client = FakeClient()
    writer = FlakyWriter(client, failures=0)
    async with write_loop(collector, writer, client):
        for mid in range(1, 6):
            await wait_until(lambda: collector._writer_idle, what="writer idle")
            deliver(collector, mid)
            await wait_until(lambda m=mid: m in client.acks, what=f"ack of {mid}")
    assert client.acks == list(range(1, 6))
