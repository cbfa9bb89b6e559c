"""The background tasks of one long-lived component, owned in one place.

``asyncio.TaskGroup`` must be entered and left by the same task; a component whose
``__aenter__`` and ``__aexit__`` may run in different tasks (a service assembling its parts,
a test fixture's setup and teardown) keeps its tasks in a :class:`TaskSet` instead: it
spawns them, logs any that die of an unexpected error, and on :meth:`close` cancels every
one and waits for all of them to finish.
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

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every task and wait (at most ``timeout_s``) for them to finish."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
