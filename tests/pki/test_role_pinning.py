"""Role-pinned server names: a client that wants the core, or gateway A, gets exactly that.

Every gateway and core certificate names ``localhost``/``127.0.0.1``, so checking the chain
and the target's host cannot tell a gateway from the core, or one gateway from another. The CA
gives each server its reserved name (``core.edgeward.internal``,
``<id>.gateway.edgeward.internal``), refuses those names to everyone else, and every client
demands the one it wants. The negative tests put a server with a valid certificate of the
wrong role (or the wrong gateway) at the address and check that the handshake fails before
any request reaches it; each has a control in which the same server, with the right
certificate, is reached, so the failure is the name's doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import pki
from device_sdk import EnrollmentUnavailable, enroll, renew
from device_sdk._grpc import ChannelPool, GatewayDown, probe
from edgeward.cli import main
from gateway._core._server import ensure_server_identity
from gateway._escalation._client import CoreClient
from gateway.errors import CoreUnavailable
from protos.edgeward.v1 import core_pb2, core_pb2_grpc, enrollment_pb2_grpc
from tests._support.gateway import start_gateway
from tests.conftest import TRUST_DOMAIN

pytestmark = pytest.mark.timeout(60)

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
Issue = Callable[..., pki.IdentityFiles]


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


# -- the CA: who gets which name ------------------------------------------------------------


def test_names_are_fixed_and_distinct() -> None:
    assert pki.core_server_name() == "core.edgeward.internal"
    assert pki.gateway_server_name("kr-seoul") == "kr-seoul.gateway.edgeward.internal"
    # A gateway called "core" is still not the core.
    assert pki.gateway_server_name("core") != pki.core_server_name()
    with pytest.raises(pki.InvalidName):
        pki.gateway_server_name("a.b")


def test_each_role_carries_its_pinned_name(issue: Issue) -> None:
    core = issue("core", "core-pin").certificate()
    gw = issue("gateway", "gw-pin").certificate()
    device = issue("device", "cam-pin").certificate()
    assert dns_names(core) == ["core.edgeward.internal", "localhost"]
    assert dns_names(gw) == ["gw-pin.gateway.edgeward.internal", "localhost"]
    san = device.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san.get_values_for_type(x509.DNSName)) == []


RESERVED = [
    "core.edgeward.internal",
    "x.gateway.edgeward.internal",
    "gw-other.gateway.edgeward.internal",
    "edgeward.internal",
    "*.gateway.edgeward.internal",
    "*.edgeward.internal",
    "*.internal",
    "*",
    "CORE.EDGEWARD.INTERNAL",
    "X.Gateway.Edgeward.Internal",
    "core.edgeward.internal.",
    "*.GATEWAY.edgeward.INTERNAL",
]


@pytest.mark.parametrize("role", [pki.Role.GATEWAY, pki.Role.CORE])
@pytest.mark.parametrize("name", RESERVED)
def test_ca_refuses_reserved_names_to_every_role(pki_dir: Path, role: pki.Role, name: str) -> None:
    ca = pki.CertificateAuthority.load(pki_dir)
    key = pki.generate_private_key()
    with pytest.raises(pki.InvalidName, match="reserved"):
        ca.issue(
            key.public_key(),
            identity=pki.Identity(ca.trust_domain, role, "srv-1"),
            now=NOW,
            dns_names=["localhost", name],
        )


def test_ca_still_issues_ordinary_names(pki_dir: Path) -> None:
    ca = pki.CertificateAuthority.load(pki_dir)
    cert = ca.issue(
        pki.generate_private_key().public_key(),
        identity=pki.Identity(ca.trust_domain, pki.Role.GATEWAY, "gw-ok"),
        now=NOW,
        dns_names=["gw.home.example", "*.corp.internal", "edge.internal"],
    )
    assert dns_names(cert) == [
        "gw-ok.gateway.edgeward.internal",
        "gw.home.example",
        "*.corp.internal",
        "edge.internal",
    ]


def test_issue_server_refuses_reserved_names(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    runner = CliRunner()
    init = runner.invoke(main, ["pki", "init", "--dir", str(d), "--trust-domain", TRUST_DOMAIN])
    assert init.exit_code == 0, init.stderr
    for role, name in [
        ("gateway", "core.edgeward.internal"),
        ("gateway", "gw-b.gateway.edgeward.internal"),
        ("core", "x.gateway.edgeward.internal"),
        ("gateway", "*.gateway.edgeward.internal"),
        ("gateway", "Core.Edgeward.Internal"),
    ]:
        result = runner.invoke(
            main,
            ["pki", "issue-server", "--dir", str(d), "--id", "gw-a", "--role", role,
             "--dns", "localhost", "--dns", name],
        )  # fmt: skip
        assert result.exit_code != 0, (role, name)
        assert not (d / "servers" / f"{role}-gw-a").exists()
    with pki.SqliteRegistry(pki.PkiLayout(d).registry) as registry:
        assert registry.list_server_certificates() == []
    ok = runner.invoke(
        main,
        ["pki", "issue-server", "--dir", str(d), "--id", "gw-a", "--role", "gateway",
         "--dns", "localhost", "--ip", "127.0.0.1"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.stderr
    cert = pki.IdentityFiles(d / "servers" / "gateway-gw-a").certificate()
    assert "gw-a.gateway.edgeward.internal" in dns_names(cert)


def test_core_config_refuses_reserved_server_names(pki_dir: Path) -> None:
    from gateway import ConfigError, load_core_settings

    with pytest.raises(ConfigError, match="server_names"):
        load_core_settings(None, pki_dir=pki_dir, server_names=["gw.gateway.edgeward.internal"])


def test_core_reissues_an_identity_without_its_pinned_name(pki_dir: Path, tmp_path: Path) -> None:
    """A core certificate from before pinned names (localhost only) is replaced at start."""
    layout = pki.PkiLayout(pki_dir)
    ca = pki.CertificateAuthority.load(pki_dir)
    issuing_key = pki.load_private_key(layout.issuing_key)
    key = pki.generate_private_key()
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.trust_domain),
                    x509.NameAttribute(NameOID.COMMON_NAME, "core-old"),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://{ca.trust_domain}/core/core-old"),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(issuing_key, hashes.SHA256())
    )
    directory = tmp_path / "core-old"
    directory.mkdir(mode=0o700)
    pki.write_identity(
        directory,
        certificate=old,
        chain_pem=ca.chain_pem(old),
        ca_bundle_pem=layout.ca_bundle.read_bytes(),
        metadata={"id": "core-old", "role": "core", "trust_domain": ca.trust_domain},
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    args: dict[str, Any] = {
        "pki_dir": pki_dir,
        "directory": directory,
        "core_id": "core-old",
        "addresses": ["127.0.0.1:7443"],
        "extra_names": [],
        "now": now,
    }
    files = ensure_server_identity(**args)
    new = files.certificate()
    assert new.serial_number != old.serial_number
    assert pki.core_server_name() in dns_names(new)
    # ... and the new one is kept at the next start.
    assert ensure_server_identity(**args).certificate().serial_number == new.serial_number


# -- a server at the address with a valid certificate of the wrong identity -----------------


class _RogueCore(core_pb2_grpc.CoreServicer, enrollment_pb2_grpc.EnrollmentServicer):
    """Answers as a core would if it were believed: heartbeats, and collects tokens."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.called = asyncio.Event()

    async def WatchRevocations(self, request: Any, context: Any) -> Any:
        self.calls.append("WatchRevocations")
        self.called.set()
        while True:
            yield core_pb2.RevocationEvent(heartbeat=True, sequence=request.since_sequence)
            await asyncio.sleep(0.05)

    async def Escalate(self, request: Any, context: Any) -> Any:
        self.calls.append("Escalate")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rogue")

    async def Enroll(self, request: Any, context: Any) -> Any:
        self.calls.append("Enroll")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rogue")

    async def Renew(self, request: Any, context: Any) -> Any:
        self.calls.append("Renew")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rogue")


@contextlib.asynccontextmanager
async def serving(
    identity: pki.IdentityFiles, *, require_client_auth: bool = False
) -> AsyncIterator[tuple[str, _RogueCore]]:
    """A gRPC server on 127.0.0.1:0 presenting ``identity``: health, plus a rogue core."""
    server = grpc.aio.server()
    rogue = _RogueCore()
    core_pb2_grpc.add_CoreServicer_to_server(rogue, server)
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(rogue, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    creds = pki.grpc_server_credentials(identity, require_client_auth=require_client_auth)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", rogue
    finally:
        await server.stop(None)


async def _health(address: str, ca: bytes, options: list[tuple[str, Any]]) -> int:
    creds = pki.grpc_channel_credentials(ca_bundle_pem=ca)
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


async def test_a_gateway_certificate_passes_the_host_check_but_not_the_core_pin(
    issue: Issue,
) -> None:
    """The finding itself: chain + host accept a gateway as the core; the pin does not."""
    gw = issue("gateway", "gw-posing")
    ca = gw.ca_bundle.read_bytes()
    async with serving(gw) as (address, _rogue):
        assert await _health(address, ca, []) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _health(address, ca, [pki.server_name_option(pki.core_server_name())])
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        pinned = [pki.server_name_option(pki.gateway_server_name("gw-posing"))]
        assert await _health(address, ca, pinned) == health_pb2.HealthCheckResponse.SERVING


async def test_enrolment_never_sends_a_token_to_a_gateway(issue: Issue, tmp_path: Path) -> None:
    gw = issue("gateway", "gw-thief")
    token = "cam-pin-1." + "A" * 43
    async with serving(gw) as (address, rogue):
        with pytest.raises(EnrollmentUnavailable):
            await enroll(
                endpoint=address,
                ca_bundle_pem=gw.ca_bundle.read_bytes(),
                token=token,
                out_dir=tmp_path / "cam",
                timeout_s=5,
            )
        assert rogue.calls == []
    # Control: the same server with a core certificate is reached (and the token sent).
    async with serving(issue("core", "core-ctl")) as (address, rogue):
        with pytest.raises(Exception) as exc:  # noqa: PT011 - the rogue refuses; any error
            await enroll(
                endpoint=address,
                ca_bundle_pem=gw.ca_bundle.read_bytes(),
                token=token,
                out_dir=tmp_path / "cam2",
                timeout_s=5,
            )
        assert not isinstance(exc.value, EnrollmentUnavailable)
        assert rogue.calls == ["Enroll"]


async def test_renewal_only_talks_to_a_core(issue: Issue) -> None:
    device = issue("device", "cam-pin-2")
    async with serving(issue("gateway", "gw-renew"), require_client_auth=True) as (addr, rogue):
        with pytest.raises(EnrollmentUnavailable):
            await renew(identity_dir=device.directory, endpoint=addr, timeout_s=5)
        assert rogue.calls == []
    async with serving(issue("core", "core-ctl"), require_client_auth=True) as (addr, rogue):
        with pytest.raises(Exception) as exc:  # noqa: PT011 - the rogue refuses; any error
            await renew(identity_dir=device.directory, endpoint=addr, timeout_s=5)
        assert not isinstance(exc.value, EnrollmentUnavailable)
        assert rogue.calls == ["Renew"]


async def test_escalation_client_only_talks_to_a_core(issue: Issue) -> None:
    me = issue("gateway", "gw-esc")
    creds = pki.grpc_channel_credentials(ca_bundle_pem=me.ca_bundle.read_bytes(), identity=me)
    async with serving(issue("gateway", "gw-other"), require_client_auth=True) as (addr, rogue):
        client = CoreClient(credentials=creds, timeout_s=3)
        try:
            with pytest.raises(CoreUnavailable) as err:
                await client.escalate(addr, core_pb2.EscalationRequest())
            assert err.value.code == "UNAVAILABLE"
        finally:
            await client.aclose()
        assert rogue.calls == []


@pytest.mark.slow
async def test_gateway_takes_no_heartbeats_from_a_gateway_posing_as_the_core(
    issue: Issue, tmp_path: Path
) -> None:
    """A stolen gateway key cannot feed another gateway "no revocations" as the core."""
    for role, believed in (("gateway", False), ("core", True)):
        impostor = issue(role, f"{role}-feed")
        async with (
            serving(impostor, require_client_auth=True) as (address, rogue),
            start_gateway(
                issue=issue,
                tmp_path=tmp_path / role,
                gateway_id="gw-fed",
                overrides={
                    "core_address": address,
                    "pki_dir": None,
                    "revocation_max_staleness_s": 10.0,
                },
            ) as gw,
        ):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0 if believed else 1.5):
                    await rogue.called.wait()
            if believed:  # control: a core at that address is listened to
                assert rogue.calls
                assert rogue.calls[0] == "WatchRevocations"
            else:
                assert rogue.calls == []
                assert not gw.service.revocation.healthy()


# -- devices and gateways -------------------------------------------------------------------


async def test_device_wanting_gateway_a_refuses_gateway_b(issue: Issue) -> None:
    device = issue("device", "cam-pin-3")
    creds = pki.grpc_channel_credentials(
        ca_bundle_pem=device.ca_bundle.read_bytes(), identity=device
    )
    pool = ChannelPool(creds)
    try:
        async with serving(issue("gateway", "gw-b"), require_client_auth=True) as (addr, _):
            with pytest.raises(GatewayDown):
                await probe(pool.get(addr, "gw-a"), timeout_s=2, device_id="cam-pin-3")
            rtt = await probe(pool.get(addr, "gw-b"), timeout_s=5, device_id="cam-pin-3")
            assert rtt >= 0
            with pytest.raises(GatewayDown):
                pool.get(addr, "Not/An/Id")
    finally:
        await pool.close()


async def _tls_server(identity: pki.IdentityFiles) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(b"ok")
            await writer.drain()
            writer.close()

    ctx = pki.server_ssl_context(identity)
    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


def _connect_blocking(port: int, ctx: ssl.SSLContext) -> bytes:
    """As paho (the MQTT client) connects: ``wrap_socket`` with the broker's host."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.recv(2)


async def test_mqtt_context_pins_the_gateway_name(issue: Issue) -> None:
    device = issue("device", "cam-pin-4")
    want_a = pki.client_ssl_context(device, server_name=pki.gateway_server_name("gw-a"))
    want_b = pki.client_ssl_context(device, server_name=pki.gateway_server_name("gw-b"))
    server = await _tls_server(issue("gateway", "gw-b"))
    port = server.sockets[0].getsockname()[1]
    try:
        # The ordinary context (host check only) accepts gateway B at 127.0.0.1 ...
        plain = pki.client_ssl_context(device)
        assert await asyncio.to_thread(_connect_blocking, port, plain) == b"ok"
        # ... the pinned one for A does not, through wrap_socket (paho) or wrap_bio (asyncio).
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(_connect_blocking, port, want_a)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=want_a)
        assert await asyncio.to_thread(_connect_blocking, port, want_b) == b"ok"
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=want_b)
        assert await reader.read(2) == b"ok"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
