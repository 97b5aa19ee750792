from __future__ import annotations

import asyncio

import pytest

from mqfleet.errors import AuthenticationError
from mqfleet.loops import leaves, run_loops


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_an_expected_error_is_raised_as_itself_and_stops_the_other_loops() -> None:
    stopped = asyncio.Event()

    async def other() -> None:
        try:
            await _forever()
        finally:
            stopped.set()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise AuthenticationError("bad token")

    with pytest.raises(AuthenticationError, match="bad token"):
        await run_loops({"other_loop": other, "failing_loop": fails})
    assert stopped.is_set()


async def test_a_bug_is_raised_with_the_whole_group() -> None:
    async def broken() -> None:
        raise ZeroDivisionError

    with pytest.raises(ExceptionGroup) as info:
        await run_loops({"broken_loop": broken, "idle_loop": _forever})
    assert [type(exc) for exc in leaves(info.value)] == [ZeroDivisionError]


async def test_cancellation_reaches_the_loops_and_the_caller_is_not_left_cancelling() -> None:
    names: set[str] = set()
    both_started = asyncio.Event()

    async def named() -> None:
        task = asyncio.current_task()
        assert task is not None
        names.add(task.get_name())
        if len(names) == 2:
            both_started.set()
        await _forever()

    runner = asyncio.create_task(run_loops({"a_loop": named, "b_loop": named}))
    await asyncio.wait_for(both_started.wait(), 10)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert names == {"a_loop", "b_loop"}
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


def test_leaves_flattens_nested_groups() -> None:
    inner = ExceptionGroup("inner", [KeyError("k")])
    outer = ExceptionGroup("outer", [ValueError("v"), inner])
    assert [type(e) for e in leaves(outer)] == [ValueError, KeyError]
