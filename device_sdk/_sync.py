"""A small synchronous facade for firmware written as a plain loop.

:class:`SyncDeviceClient` runs a :class:`~device_sdk.DeviceClient` on an event loop in a
background thread and exposes blocking calls. Everything the async client promises (the
on-disk outbox, failover, renewal, final errors) holds here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from device_sdk._client import ClientOptions, ClientStats, DeviceClient
from device_sdk._types import DetectionResult, DeviceEvent, FrameOutcome, GatewayInfo, Telemetry

__all__ = ["SyncDeviceClient"]

_T = TypeVar("_T")


class SyncDeviceClient:
    """Blocking wrapper around :class:`DeviceClient`::

    with SyncDeviceClient("/var/lib/edgeward/identity") as client:
        result = client.detect(jpeg_bytes, timeout_s=10)
    """

    def __init__(self, identity_dir: Path | str, options: ClientOptions | None = None) -> None:
        # Construct here, on the caller's thread, so NotEnrolled surfaces at once.
        self._client = DeviceClient(identity_dir, options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="edgeward-device-client", daemon=True
        )
        self._results: asyncio.Queue[FrameOutcome] | None = None
        self._started = False

    @property
    def client(self) -> DeviceClient:
        """The underlying async client (use it only from coroutines run by :meth:`run`)."""
        return self._client

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("the device client did not answer in time") from None

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run a coroutine on the client's loop and return its result."""
        return self._call(coro, timeout)

    def start(self) -> SyncDeviceClient:
        """Start the loop thread and the client (probe gateways, open the outbox)."""
        self._thread.start()
        try:
            self._call(self._client.__aenter__())
        except BaseException:
            self._stop_loop()
            raise
        self._started = True
        return self

    def close(self) -> None:
        """Stop the client and its thread; queued frames stay on disk."""
        if self._started:
            self._started = False
            self._call(self._client.aclose())
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> SyncDeviceClient:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def submit(self, image: bytes, *, frame_id: str | None = None) -> str:
        """Accept a frame into the outbox; see :meth:`DeviceClient.submit`."""
        return self._call(self._client.submit(image, frame_id=frame_id))

    def detect(self, image: bytes, *, timeout_s: float | None = None) -> DetectionResult:
        """Submit a frame and wait for its detections; see :meth:`DeviceClient.detect`."""
        return self._call(self._client.detect(image, timeout_s=timeout_s))

    def report_telemetry(self, telemetry: Telemetry) -> bool:
        """Queue a telemetry report; see :meth:`DeviceClient.report_telemetry`."""
        return self._call(self._client.report_telemetry(telemetry))

    def next_result(self, timeout_s: float | None = None) -> FrameOutcome | None:
        """The next outcome of a submitted frame, or ``None`` after ``timeout_s`` seconds."""
        return self._call(_next(self._client.results(), timeout_s))

    def next_event(self, timeout_s: float | None = None) -> DeviceEvent | None:
        """The next event for this device, or ``None`` after ``timeout_s`` seconds."""
        return self._call(_next(self._client.events(), timeout_s))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the outbox is empty; ``False`` if ``timeout_s`` passed first."""
        return self._call(self._client.flush(timeout_s))

    def stats(self) -> ClientStats:
        return self._client.stats()

    @property
    def gateway(self) -> GatewayInfo | None:
        return self._client.gateway


async def _next(iterator: AsyncGenerator[_T, None], timeout_s: float | None) -> _T | None:
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(iterator, None)
    except TimeoutError:
        return None
    finally:
        await iterator.aclose()
