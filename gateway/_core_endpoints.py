"""The gateway's way to its cores: an ordered list of addresses, one pinned channel recipe.

Every call a gateway makes to the core (the revocation feed, ``GetDevice``,
``AnnounceGateway``, ``GetCrl``, ``Escalate``) goes through :class:`CoreEndpoints`, and this
is the only module of the gateway that builds a gRPC channel or channel credentials (a test
reads every module to hold it so):

- **One channel recipe.** :func:`core_channel_credentials` presents the gateway's own
  certificate and trusts only its CA bundle; :meth:`CoreEndpoints.channel` builds a
  mutual-TLS channel with them that demands the core's role-pinned name
  (``core.edgeward.internal``, :func:`pki.core_server_name`). Every gateway certificate names
  ``localhost`` too, so the address alone would let a stolen gateway key pose as the core; the
  pin holds for every address of the list. The same channel arguments
  (:data:`CHANNEL_OPTIONS`) hold for every call: keepalive pings on busy connections, so a
  core that vanished without closing its connection (a dead host, a dropped NAT entry) is
  noticed within :data:`KEEPALIVE_TIME_MS` + :data:`KEEPALIVE_TIMEOUT_MS` rather than when a
  deadline runs out, and one message size limit (:data:`MAX_MESSAGE_BYTES`) both ways.
- **Failover.** Replicas of the core share one registry, so any of them can answer. A call
  goes to the *current* address; on ``UNAVAILABLE``, ``DEADLINE_EXCEEDED`` or a lost
  connection it moves to the next address (wrapping around) and tries again, with full-jitter
  backoff between rounds, so gateways that lost a replica together do not all land on the
  next one in the same millisecond. Any other status is an answer and is raised as is.
- **Stickiness.** The gateway stays on the address that last answered; it does not move back
  to the first one when that returns (a replica that just restarted is not preferred over
  one that is serving, and gateways spread over replicas as they fail over). Restarting the
  gateway starts again from the first address.

The addresses come from ``core_address`` in the configuration: one ``host:port``, a comma
list, or a TOML list (:func:`parse_core_addresses`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import structlog

import pki
from protos.edgeward.v1 import core_pb2_grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "FAILOVER_CODES",
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "MAX_MESSAGE_BYTES",
    "CoreEndpoints",
    "core_channel_credentials",
    "join_core_addresses",
    "parse_core_addresses",
]

_log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Codes after which the same call may succeed on another replica: the replica is down, cut
#: off, or did not answer in time. Every other code is the core's answer.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Largest request or reply on a gateway-to-core channel, both ways: an ``Escalate`` request
#: carries crops, which are shrunk well below it.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: A keepalive ping after this long without a frame from the core while a call is open (the
#: revocation stream is always open). Idle channels send none
#: (``grpc.keepalive_permit_without_calls`` stays 0), and the core accepts pings this often
#: (its ``grpc.http2.min_ping_interval_without_data_ms`` is below it), so it never answers
#: them with ``GOAWAY too_many_pings``.
KEEPALIVE_TIME_MS = 20_000

#: A ping unanswered this long closes the connection: open calls fail with ``UNAVAILABLE``
#: and move to the next core.
KEEPALIVE_TIMEOUT_MS = 10_000

#: The channel arguments of every gateway-to-core channel.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Only a core may answer, at every address of the list.
    pki.server_name_option(pki.core_server_name()),
    # Reconnect quickly once a replica is back: callers have their own backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC's own ping deadline (60 s by default) is what closes the connection in the gRPC
    # this ships with; the keepalive timeout alone is not enforced. Same bound for both.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # The revocation stream only receives: without this, gRPC stops pinging after two pings
    # with no frame sent, and a stream older than that would have no keepalive at all.
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def core_channel_credentials(identity: pki.IdentityFiles) -> grpc.ChannelCredentials:
    """mTLS channel credentials presenting the gateway's ``identity``, trusting its CA bundle.

    The one place the gateway turns its identity into gRPC credentials for the core.
    """
    return pki.grpc_channel_credentials(
        ca_bundle_pem=identity.ca_bundle.read_bytes(), identity=identity
    )


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} must be host:port")
    return value


def parse_core_addresses(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"a:1, b:2"`` or ``["a:1", "b:2"]`` → ``("a:1", "b:2")``: validated, first kept first.

    Duplicates are dropped (listing a replica twice would only make it be tried twice). Raises
    ``ValueError`` for an empty list or an address that is not ``host:port``.
    """
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("core addresses are host:port strings")  # noqa: TRY004 - pydantic
        for part in item.split(","):
            address = part.strip()
            if address and _host_port(address) not in out:
                out.append(address)
    if not out:
        raise ValueError("no core address given")
    return tuple(out)


def join_core_addresses(addresses: Sequence[str]) -> str:
    """The one-string form of an address list (``a:1,b:2``), as configuration holds it."""
    return ",".join(addresses)


class CoreEndpoints:
    """The gateway's cores: pinned channels to each address, failover between them.

    ``credentials`` are the gateway's mTLS channel credentials
    (:func:`core_channel_credentials`, or :meth:`for_identity`). ``options`` are extra channel
    arguments, added after :data:`CHANNEL_OPTIONS`; one that names the core pin is refused
    (``ValueError``): no caller may point a gateway-to-core channel at another name.
    ``backoff_base_s``/``backoff_cap_s`` bound the jittered wait
    between rounds over the whole list. Unary calls share one long-lived channel per
    address (:meth:`call`); streams open their own (:meth:`channel`). ``aclose`` closes the
    shared ones.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials,
        options: Sequence[tuple[str, Any]] = (),
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.addresses = parse_core_addresses(addresses)
        self._credentials = credentials
        pin = pki.server_name_option(pki.core_server_name())
        if any(key == pin[0] for key, _ in options):
            raise ValueError("the core's pinned name cannot be overridden")
        self._options = [*CHANNEL_OPTIONS, *options]
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._current = 0
        self._shared: dict[str, grpc.aio.Channel] = {}
        #: How many times a call moved to another address (for logs, metrics and tests).
        self.failovers = 0

    @classmethod
    def for_identity(
        cls,
        addresses: str | Sequence[str],
        identity: pki.IdentityFiles,
        **kwargs: Any,
    ) -> CoreEndpoints:
        """Endpoints presenting ``identity`` and trusting its CA bundle."""
        return cls(addresses, credentials=core_channel_credentials(identity), **kwargs)

    # -- addresses --------------------------------------------------------------------------

    @property
    def current(self) -> str:
        """The address calls go to first."""
        return self.addresses[self._current]

    def order(self) -> list[str]:
        """Every address once, the current one first, then the rest in list order."""
        n = len(self.addresses)
        return [self.addresses[(self._current + i) % n] for i in range(n)]

    def succeeded(self, address: str) -> None:
        """``address`` answered: stay on it."""
        if address in self.addresses:
            self._current = self.addresses.index(address)

    def failed(self, address: str, reason: str) -> None:
        """``address`` did not answer: the next call starts at the address after it."""
        if address != self.current or len(self.addresses) == 1:
            return  # another call already moved on
        self._current = (self._current + 1) % len(self.addresses)
        self.failovers += 1
        _log.warning(
            "core unreachable; trying the next one", core=address, next=self.current, reason=reason
        )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before round ``attempt`` (0 = none) over the list: full jitter."""
        if attempt <= 0:
            return 0.0
        ceiling = min(self._backoff_cap_s, self._backoff_base_s * 2 ** (attempt - 1))
        return self._rng.uniform(0.0, ceiling)

    # -- channels ---------------------------------------------------------------------------

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        """A new pinned mTLS channel to ``address`` (default: the current one); caller closes."""
        return grpc.aio.secure_channel(
            address or self.current, self._credentials, options=self._options
        )

    def stub(self, address: str) -> core_pb2_grpc.CoreStub:
        """A ``Core`` stub on the shared channel to ``address``."""
        channel = self._shared.get(address)
        if channel is None:
            channel = self._shared[address] = self.channel(address)
        return core_pb2_grpc.CoreStub(channel)

    def shared_channel(self, address: str) -> grpc.aio.Channel:
        """The shared channel to ``address`` (for services other than ``Core``)."""
        self.stub(address)
        return self._shared[address]

    async def call(
        self,
        fn: Callable[[str], Awaitable[T]],
        *,
        rounds: int = 1,
    ) -> T:
        """``await fn(address)`` on the current address, failing over on the way.

        ``fn`` makes one call to ``address`` (through :meth:`stub` or :meth:`shared_channel`).
        A :data:`FAILOVER_CODES` error moves to the next address; after ``rounds`` rounds over
        the whole list (jittered backoff between them) the last error is raised. Any other
        error is raised at once.
        """
        last: grpc.aio.AioRpcError | None = None
        for attempt in range(max(1, rounds)):
            delay = self.backoff(attempt)
            if delay:
                await asyncio.sleep(delay)
            for address in self.order():
                try:
                    result = await fn(address)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in FAILOVER_CODES:
                        raise
                    last = exc
                    self.failed(address, exc.code().name)
                    continue
                self.succeeded(address)
                return result
        assert last is not None  # noqa: S101 - at least one address was tried
        raise last

    async def aclose(self) -> None:
        """Close the shared channels."""
        shared, self._shared = self._shared, {}
        for channel in shared.values():
            await channel.close(None)

    async def __aenter__(self) -> CoreEndpoints:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
