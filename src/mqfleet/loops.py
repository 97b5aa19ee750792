"""Structured asyncio for long-running components: named loops in one TaskGroup.

The agent, the collector and the simulator each run a handful of ``*_loop`` coroutines
that live and die together. :func:`run_loops` starts them, named, in one TaskGroup and
turns the ExceptionGroup a failure produces back into the one error callers expect.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mqfleet.errors import MqfleetError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping

__all__ = ["leaves", "run_loops"]


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Flatten nested exception groups into the exceptions that were really raised."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(leaves(exc))
        else:
            found.append(exc)
    return found


async def _task_group(loops: Mapping[str, Callable[[], Coroutine[object, object, None]]]) -> None:
    async with asyncio.TaskGroup() as tg:
        for name, loop in loops.items():
            tg.create_task(loop(), name=name)


async def run_loops(loops: Mapping[str, Callable[[], Coroutine[object, object, None]]]) -> None:
    """Run each ``name -> loop`` as a named task until all end, one fails, or we are cancelled.

    Expected failures (subclasses of :class:`MqfleetError`, e.g. bad credentials) are
    raised as themselves, so callers catch them by type; anything else is a bug and the
    whole group is raised, nothing hidden.
    """
    # The TaskGroup runs in a task of its own: on Python 3.11 a TaskGroup whose child
    # fails leaves its parent task's cancel count raised, which would leak into the
    # caller's task (its cancelling(), asyncio.timeout and TaskGroup bookkeeping).
    # Cancelling this coroutine cancels the awaited task too.
    task = asyncio.create_task(_task_group(loops), name="+".join(loops))
    try:
        await task
    except BaseExceptionGroup as group:
        found = leaves(group)
        if not found or not all(isinstance(exc, MqfleetError) for exc in found):
            raise
        raise found[0] from None
