"""What every edgeward gRPC server does the same way at the wire: its options, how it binds a
port, and how it answers bytes that are not the protobuf message a method takes.

Used by the gateway's device server (:mod:`gateway._grpc._server`) and the core's server
(:mod:`gateway._core._server`, both of its ports).

* **One process per port.** gRPC sets ``SO_REUSEPORT`` on its listening sockets by default, so
  a second process started on a port already in use binds it too and the kernel splits new
  connections between the two (enrolments, renewals and the revocation feed then answered by
  whichever process the kernel picks). :data:`SERVER_OPTIONS` turns it off, and :func:`bind`
  checks the address first with a plain socket, so a port already taken stops the start-up
  with one line naming the setting (:class:`ListenError`), before gRPC logs anything.
* **Malformed requests.** gRPC answers a request its deserializer cannot parse with
  ``UNKNOWN`` and the name of a Python exception, and nothing of ours logs or counts it.
  :func:`add_service` registers a service with every request deserializer wrapped: bytes that
  do not parse become a marker, and the method is answered ``INVALID_ARGUMENT`` ("malformed
  request: not a valid <message>") without running the handler, logged once (method, message
  type, peer address; never the payload) and counted through ``on_malformed``. On a request
  stream the marker arrives in order: the messages before it are served, and the handler then
  sees
  :class:`MalformedRequest` from its request iterator, an :class:`~gateway.errors.InvalidRequest`
  that it answers like any other (``INVALID_ARGUMENT``); a handler that lets it through or
  ignores it is answered by the wrapper.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pool

from gateway.errors import InvalidRequest, ListenError

__all__ = [
    "SERVER_OPTIONS",
    "ListenError",
    "MalformedHook",
    "MalformedRequest",
    "add_service",
    "bind",
    "check_listen",
]

_log = structlog.get_logger(__name__)

#: Options every edgeward gRPC server starts with (see the module docstring).
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.so_reuseport", 0),)

#: Called with a method's name (``"Detect"``) each time a request to it does not parse.
MalformedHook = Callable[[str], None]


# ------------------------------------------------------------------------------ ports
def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def check_listen(address: str, *, setting: str) -> None:
    """Raise :class:`ListenError` when ``address`` (``host:port``) cannot be bound now.

    A plain socket with ``SO_REUSEADDR`` (as gRPC, Mosquitto and the metrics server use) and
    without ``SO_REUSEPORT``: it fails exactly when something listens there already. Only that
    is reported here; port 0, names that do not resolve and addresses of a name the server may
    skip (``localhost``'s ``::1`` on a host without IPv6) are left to the server itself.
    """
    exc = _probe(address)
    if exc is not None and exc.errno in (errno.EADDRINUSE, errno.EACCES):
        raise ListenError.from_os_error(exc, setting=setting, address=address)


def _probe(address: str) -> OSError | None:
    """The first error binding one of ``address``'s resolved addresses, if any."""
    parts = _split(address)
    if parts is None or parts[1] == 0:
        return None
    host, port = parts
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return exc
    return None


def bind(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials,
    *,
    setting: str,
) -> int:
    """Bind ``address`` on ``server`` with TLS ``credentials``; the bound port.

    Raises :class:`ListenError` naming ``setting`` when the address is taken or unusable
    (checked first; gRPC's own refusal, should another process take the port in between, is
    reported the same way).
    """
    check_listen(address, setting=setting)
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises this when no address could be bound
        port = 0
    if not port:
        exc = _probe(address)
        if exc is not None:
            raise ListenError.from_os_error(exc, setting=setting, address=address)
        raise ListenError(
            setting=setting, address=address, reason="address in use or not available"
        )
    return port


# ------------------------------------------------------------------------------ malformed
class MalformedRequest(InvalidRequest):
    """A request message that is not a valid protobuf of the method's request type."""

    def __init__(self, message: str) -> None:
        super().__init__(f"malformed request: not a valid {message}")
        self.message = message


@dataclass(frozen=True, slots=True)
class _Malformed:
    """What a wrapped deserializer returns for bytes that do not parse."""

    message: str


def _message_name(deserializer: Callable[[bytes], Any], full_method: str) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    if isinstance(name, str):
        return name
    service, _, method = full_method.strip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return "request"
    return str(found.input_type.full_name)


def _safe(deserializer: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any failure to parse means: not a valid message
            return _Malformed(message)

    return deserialize


def _peer_host(context: Any) -> str:
    kind, _, rest = str(context.peer()).partition(":")
    if kind in {"ipv4", "ipv6"}:
        return rest.rpartition(":")[0].removeprefix("[").removesuffix("]") or rest
    return kind


class _Guard:
    """Wraps one method handler's behaviour (see the module docstring)."""

    def __init__(self, method: str, service: str, hook: MalformedHook | None) -> None:
        self.method = method
        self.service = service
        self.hook = hook

    def record(self, context: Any, marker: _Malformed) -> None:
        # Never the payload: it may be anything, a secret included.
        _log.warning(
            "malformed request",
            service=self.service,
            method=self.method,
            message=marker.message,
            peer=_peer_host(context),
        )
        if self.hook is not None:
            self.hook(self.method)

    async def refuse(self, context: Any, marker: _Malformed) -> None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: not a valid {marker.message}"
        )

    def requests(
        self, iterator: AsyncIterator[Any], context: Any, seen: list[_Malformed]
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in iterator:
                if isinstance(request, _Malformed):
                    seen.append(request)
                    self.record(context, request)
                    raise MalformedRequest(request.message)
                yield request

        return checked()

    def unary_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(request: Any, context: Any) -> Any:
            if isinstance(request, _Malformed):
                self.record(context, request)
                await self.refuse(context, request)
            return await behavior(request, context)

        return handle

    def unary_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                self.record(context, request)
                await self.refuse(context, request)
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write and returns None
                await result

        return handle

    def stream_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(iterator: AsyncIterator[Any], context: Any) -> Any:
            seen: list[_Malformed] = []
            try:
                response = await behavior(self.requests(iterator, context, seen), context)
            except MalformedRequest:
                response = None
            if seen:
                await self.refuse(context, seen[0])
            return response

        return handle

    def stream_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            seen: list[_Malformed] = []
            result = behavior(self.requests(iterator, context, seen), context)
            try:
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:
                    await result
            except MalformedRequest:
                pass
            if seen:
                await self.refuse(context, seen[0])

        return handle


def _guarded(
    service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any], hook: MalformedHook | None
) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = handler.request_deserializer
    if deserializer is None:  # raw bytes: nothing to parse
        return handler
    full = f"/{service}/{method}"
    guard = _Guard(method, service, hook)
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behavior = getattr(handler, kind)
    return handler._replace(  # type: ignore[attr-defined, no-any-return]
        request_deserializer=_safe(deserializer, _message_name(deserializer, full)),
        **{kind: getattr(guard, kind)(behavior)},
    )


class _Collector:
    """Stands in for a server while a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, Mapping[str, grpc.RpcMethodHandler[Any, Any]]]] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        pass  # the same handlers arrive below, by service

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services.append((service, handlers))


def add_service(
    server: grpc.aio.Server,
    register: Callable[[Any, Any], None],
    servicer: Any,
    *,
    on_malformed: MalformedHook | None = None,
) -> None:
    """``register(servicer, server)`` (a generated ``add_*Servicer_to_server``), with every
    request deserializer guarded (see the module docstring)."""
    collector = _Collector()
    register(servicer, collector)
    if not collector.services:
        raise TypeError(f"{register!r} registered no method handlers")
    for service, handlers in collector.services:
        guarded = {
            name: _guarded(service, name, handler, on_malformed)
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        # The fast path gRPC takes for methods known in advance (missing from the type stubs).
        server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
