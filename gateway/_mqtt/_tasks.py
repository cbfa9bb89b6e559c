"""The background tasks of one long-lived component, owned in one place.

``asyncio.TaskGroup`` must be entered and left by the same task; a component whose
``__aenter__`` and ``__aexit__`` may run in different tasks (a service assembling its parts,
a test fixture's setup and teardown) keeps its tasks in a :class:`TaskSet` instead: it
spawns them, logs any that die of an unexpected error, and on :meth:`close` cancels every
one (again, until it ends: a cancellation can be lost) and waits, within a bound, for all of
them to finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

__all__ = ["TaskSet"]

_log = structlog.get_logger(__name__)


class TaskSet:
    """Background tasks owned by one component."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error(
                "background task failed",
                component=self._name,
                task=task.get_name(),
                exc_info=exc,
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float = 10.0, *, recancel_s: float = 1.0) -> None:
        """Cancel every task and wait (at most ``timeout_s``) for them to finish.

        A cancellation can be lost: before Python 3.12, ``asyncio.wait_for`` (which aiomqtt
        uses for its connect and disconnect) returns the result instead of raising when the
        awaited future completes in the same loop turn as the cancel, so a reconnect loop
        carries on as if never cancelled. Tasks still running are therefore cancelled again
        every ``recancel_s`` until they end; any left at ``timeout_s`` are logged.
        """
        self._closed = True
        pending = set(self._tasks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending:
            for task in pending:
                task.cancel()
            left = deadline - loop.time()
            if left <= 0:
                break
            _done, pending = await asyncio.wait(pending, timeout=min(recancel_s, left))
        if pending:
            _log.error(
                "background tasks did not stop",
                component=self._name,
                tasks=sorted(t.get_name() for t in pending),
            )
