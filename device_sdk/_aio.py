"""Small asyncio helpers shared by the client's buffers."""

from __future__ import annotations

import asyncio

__all__ = ["wait_either"]


async def wait_either(ready: asyncio.Event, stopping: asyncio.Event) -> None:
    """Return once ``ready`` or ``stopping`` is set; never leaves a waiter task behind."""
    ready_wait = asyncio.ensure_future(ready.wait())
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({ready_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready_wait.cancel()
        stop_wait.cancel()
