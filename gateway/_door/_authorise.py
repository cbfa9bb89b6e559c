"""Per-method authorisation: what a device of a given type may call.

A device's type and status live in the registry, not in its certificate, so they can change
without reissuing (DESIGN.md, "Identity"). :class:`Authoriser` looks them up through a
:class:`DeviceDirectory` (the core's ``Core.GetDevice`` when the gateway has a core, the PKI
registry when it runs standalone), caches each answer for ``ttl_s``, and checks the method
against ``[authorisation]`` (:class:`~gateway._config.AuthorisationSettings`).

A device the registry does not know gets the default method set (see the settings). A device
the registry marks ``revoked`` is refused as revoked even before the revocation feed says so.
When the directory cannot be reached, a cached answer up to ``stale_grace`` × ``ttl_s`` old is
used; with none, the call is refused as unavailable rather than guessed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog

import pki
from gateway._config import AuthorisationSettings
from gateway._core_endpoints import CoreEndpoints
from gateway.errors import DeviceRevoked, PermissionDenied, RegistryUnavailable
from protos.edgeward.v1 import core_pb2

__all__ = [
    "Authoriser",
    "CoreDeviceDirectory",
    "DeviceDirectory",
    "DeviceInfo",
    "RegistryDeviceDirectory",
    "StaticDeviceDirectory",
]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Registry facts about a device."""

    device_id: str
    device_type: str | None
    region: str | None
    status: str  # "active", "revoked", or "unknown" (not in the registry)


class DeviceDirectory(Protocol):
    """Where registry facts come from. ``None``: the registry does not know the device.

    Raises :class:`RegistryUnavailable` when the registry cannot be asked.
    """

    async def get_device(self, device_id: str) -> DeviceInfo | None: ...


class StaticDeviceDirectory:
    """Facts from a mapping (device id → type); for tests and single-host setups."""

    def __init__(self, types: Mapping[str, str], *, revoked: frozenset[str] = frozenset()) -> None:
        self._types = types  # read at each lookup, so the owner may change it
        self._revoked = revoked

    async def get_device(self, device_id: str) -> DeviceInfo | None:
        if device_id not in self._types:
            return None
        status = "revoked" if device_id in self._revoked else "active"
        return DeviceInfo(device_id, self._types[device_id], None, status)


class CoreDeviceDirectory:
    """Facts from the cores' ``Core.GetDevice`` (pinned mTLS, failover between replicas)."""

    def __init__(self, endpoints: CoreEndpoints, *, timeout_s: float) -> None:
        self._endpoints = endpoints
        self._timeout_s = timeout_s

    async def get_device(self, device_id: str) -> DeviceInfo | None:
        request = core_pb2.GetDeviceRequest(device_id=device_id)

        async def get(address: str) -> Any:
            # grpc-stubs types the stub's methods as synchronous; on aio they are awaitable.
            method: Any = self._endpoints.stub(address).GetDevice
            return await method(request, timeout=self._timeout_s)

        try:
            info = await self._endpoints.call(get)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise RegistryUnavailable(f"core GetDevice failed: {exc.code().name}") from exc
        return DeviceInfo(
            info.device_id or device_id,
            info.device_type or None,
            info.region or None,
            info.status or "active",
        )


class RegistryDeviceDirectory:
    """Facts from the PKI registry (standalone gateways), read off the event loop."""

    def __init__(self, registry: pki.Registry) -> None:
        self._registry = registry

    async def get_device(self, device_id: str) -> DeviceInfo | None:
        try:
            record = await asyncio.to_thread(self._registry.get_device, device_id)
        except pki.RegistryError as exc:
            raise RegistryUnavailable(f"registry unreadable: {exc}") from exc
        if record is None:
            return None
        return DeviceInfo(device_id, record.type, record.region, str(record.status))


class Authoriser:
    """Checks that a device may call a method; caches registry facts for ``ttl_s``."""

    def __init__(
        self,
        directory: DeviceDirectory,
        settings: AuthorisationSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
        stale_grace: float = 10.0,
    ) -> None:
        self._directory = directory
        self._settings = settings
        self._clock = clock
        self._max_entries = max_entries
        self._stale_grace = stale_grace
        self._cache: OrderedDict[str, tuple[float, DeviceInfo]] = OrderedDict()

    def forget(self, device_id: str) -> None:
        """Drop the cached facts (on a revocation event, say)."""
        self._cache.pop(device_id, None)

    async def device_info(self, device_id: str) -> DeviceInfo:
        now = self._clock()
        ttl = self._settings.device_info_ttl_s
        cached = self._cache.get(device_id)
        if cached is not None and now - cached[0] <= ttl:
            return cached[1]
        try:
            info = await self._directory.get_device(device_id)
        except RegistryUnavailable:
            if cached is not None and now - cached[0] <= ttl * self._stale_grace:
                _log.warning("registry unavailable; using cached device facts", device_id=device_id)
                return cached[1]
            raise
        if info is None:
            info = DeviceInfo(device_id, None, None, "unknown")
        self._cache[device_id] = (now, info)
        self._cache.move_to_end(device_id)
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return info

    def cached_info(self, device_id: str) -> DeviceInfo | None:
        """The device's facts when they are cached and fresh (no look-up), else ``None``."""
        cached = self._cache.get(device_id)
        if cached is None or self._clock() - cached[0] > self._settings.device_info_ttl_s:
            return None
        return cached[1]

    def check_cached(
        self, device_id: str, method: str, *, serial: str | None = None
    ) -> DeviceInfo | None:
        """:meth:`check` without waiting: ``None`` when the facts must be looked up first."""
        info = self.cached_info(device_id)
        if info is None:
            return None
        return self._judge(info, device_id, method, serial)

    async def check(self, device_id: str, method: str, *, serial: str | None = None) -> DeviceInfo:
        """Raise unless ``device_id`` may call ``method`` (a ``DeviceGateway`` method name)."""
        return self._judge(await self.device_info(device_id), device_id, method, serial)

    def _judge(
        self, info: DeviceInfo, device_id: str, method: str, serial: str | None
    ) -> DeviceInfo:
        if info.status == "revoked":
            raise DeviceRevoked(device_id, serial)
        if method not in self._settings.allowed(info.device_type):
            kind = info.device_type or "unregistered"
            raise PermissionDenied(
                f"a {kind} device may not call {method}", reason="method_not_allowed"
            )
        return info
