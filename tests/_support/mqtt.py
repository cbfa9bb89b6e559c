"""Helpers for tests (and benchmarks) that need a real, managed Mosquitto.

:class:`BrokerHarness` starts :class:`gateway._mqtt.MosquittoBroker` on free ports with a
gateway identity from the test PKI and a CRL the test controls (``revoke(identity)`` adds the
certificate's serial), plus the control client and the revocation enforcer.
:func:`device_client` gives an aiomqtt client presenting a device identity;
:func:`cli_tls_args` the ``mosquitto_pub``/``mosquitto_sub`` options for the same.
:func:`mint_odd_certificate` signs a certificate with any CN (``#``, ``+``, ``a/b``), SANs and EKU
with a CA's key directly (the device CA by default): our CA refuses such certificates, and the
broker must refuse them too.
:func:`mqtt_gateway` runs a whole :class:`gateway._service.GatewayService` whose ``[mqtt]``
table starts the broker and the bridge, with a registry the test drives (devices, revocations).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import pki
from gateway import (
    Box,
    Detection,
    EventHub,
    FrontDoor,
    InferenceResult,
    MqttSettings,
    RevocationState,
)
from gateway._mqtt import (
    NODELAY,
    BridgeConnection,
    BrokerControl,
    CrlSnapshot,
    IngestLimit,
    MosquittoBroker,
    RevocationEnforcer,
)
from gateway.errors import InvalidImage

__all__ = [
    "MODELS_DIR",
    "BrokerHarness",
    "FakeEngine",
    "MqttGateway",
    "cli_tls_args",
    "collect",
    "device_client",
    "flood_until_cut",
    "frame_props",
    "front_door",
    "mint_odd_certificate",
    "mqtt_gateway",
    "mqtt_gateway_settings",
    "standalone_pki",
]

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def mint_odd_certificate(
    pki_dir: Path,
    out_dir: Path,
    *,
    common_name: str,
    lifetime: dt.timedelta | None = None,
    issuer: str = "device",
    uris: tuple[str, ...] = (),
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> pki.IdentityFiles:
    """A client certificate signed with a CA's key directly, bypassing every profile check
    (for negative tests): ``issuer`` "device" (the device CA) or "issuing" (the issuing CA);
    ``uris`` its URI SANs; ``eku`` its extended key usages (``None``: no EKU extension)."""
    layout = pki.PkiLayout(pki_dir)
    key_path, cert_path = (
        (layout.device_key, layout.device_cert)
        if issuer == "device"
        else (layout.issuing_key, layout.issuing_cert)
    )
    ca_key = pki.load_private_key(key_path)
    ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + (lifetime or dt.timedelta(days=1)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pki.write_identity(
        out_dir,
        certificate=cert,
        chain_pem=cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_bundle_pem=layout.ca_bundle.read_bytes(),
        metadata={"note": "odd certificate for negative tests"},
        key_pem=key_pem,
    )


@dataclass
class BrokerHarness:
    """A managed broker, its control client and revocation enforcer, on free ports."""

    pki_dir: Path
    gateway: pki.IdentityFiles
    data_dir: Path
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    #: The broker's per-device ingest limit (none by default: the bridge's tests see all).
    ingest: IngestLimit | None = None
    revoked: list[tuple[int, dt.datetime]] = field(default_factory=list)
    #: Revocations so far: the sequence the CRLs report.
    sequence: int = 0
    #: The next fetches that fail (a core that does not answer), then the next that serve the
    #: CRLs as they were before the latest revocation (a lagging replica): seams of our own.
    failing_fetches: int = 0
    stale_fetches: int = 0
    fetches: int = 0

    broker: MosquittoBroker = field(init=False)
    control: BrokerControl = field(init=False)
    enforcer: RevocationEnforcer = field(init=False)
    settings: MqttSettings = field(init=False)

    async def crl(self) -> CrlSnapshot:
        """Both CRLs, each listing the revoked serials its CA issued (as the core builds them)."""
        self.fetches += 1
        if self.failing_fetches > 0:
            self.failing_fetches -= 1
            raise ConnectionError("CRL source unavailable (test)")
        revoked, sequence = list(self.revoked), self.sequence
        if self.stale_fetches > 0 and revoked:
            self.stale_fetches -= 1
            revoked, sequence = revoked[:-1], sequence - 1
        ca = pki.CertificateAuthority.load(self.pki_dir)
        now = dt.datetime.now(dt.UTC)
        serials = {s for s, _ in revoked}
        ours = {
            s for s in serials if self._issued_by_device_ca.get(s, True)
        }  # unknown serials: devices'

        def build() -> CrlSnapshot:
            device = ca.build_crl([r for r in revoked if r[0] in ours], now=now, devices=True)
            issuing = ca.build_crl([r for r in revoked if r[0] not in ours], now=now)
            return CrlSnapshot((issuing, device), sequence)

        return await asyncio.to_thread(build)

    def revoke_serial(self, identity: pki.IdentityFiles) -> int:
        """Add the identity's certificate to its CA's CRL (what the core's registry would do);
        the revocation's sequence."""
        cert = identity.certificate()
        device_ca = x509.load_pem_x509_certificate(
            pki.PkiLayout(self.pki_dir).device_cert.read_bytes()
        )
        self._issued_by_device_ca[cert.serial_number] = cert.issuer == device_ca.subject
        self.revoked.append((cert.serial_number, dt.datetime.now(dt.UTC)))
        self.sequence += 1
        return self.sequence

    _issued_by_device_ca: dict[int, bool] = field(default_factory=dict, init=False)

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[BrokerHarness]:
        self.settings = MqttSettings(
            data_dir=self.data_dir,
            port=0,
            bridge_port=0,
            **{"telemetry_workers": 0, **self.settings_overrides},
        )
        async with contextlib.AsyncExitStack() as stack:
            self.broker = await stack.enter_async_context(
                MosquittoBroker(
                    self.settings, identity=self.gateway, crl_source=self.crl, ingest=self.ingest
                )
            )
            creds = self.broker.credentials
            self.control = await stack.enter_async_context(
                BrokerControl(
                    host=self.settings.bridge_host,
                    port=self.broker.bridge_port,
                    tls_context=pki.client_ssl_context(self.gateway),
                    username=creds.control_username,
                    password=creds.control_password,
                )
            )
            await self.control.wait_connected()
            self.enforcer = await stack.enter_async_context(
                RevocationEnforcer(self.broker, self.control)
            )
            yield self

    @property
    def port(self) -> int:
        return self.broker.port

    def bridge_connection(self) -> BridgeConnection:
        creds = self.broker.credentials
        return BridgeConnection(
            host=self.settings.bridge_host,
            port=self.broker.bridge_port,
            identity=self.gateway,
            username=creds.bridge_username,
            password=creds.bridge_password,
        )


def device_client(
    identity: pki.IdentityFiles | None,
    port: int,
    *,
    ca_bundle: Path | None = None,
    identifier: str | None = None,
    clean_start: bool = True,
    timeout: float = 5.0,
    session_expiry_s: int | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client presenting ``identity`` (``None``: no certificate at all).

    ``session_expiry_s``: keep the session (subscriptions, queued QoS 1 messages) that long
    after a disconnect (MQTT 5; with ``clean_start=False`` it is resumed on reconnect).
    """
    props = None
    if session_expiry_s is not None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
    if identity is not None:
        ctx = pki.client_ssl_context(identity)
    else:
        import ssl

        assert ca_bundle is not None
        ctx = ssl.create_default_context(cafile=str(ca_bundle))
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=ctx,
        clean_start=clean_start,
        timeout=timeout,
        properties=props,
        socket_options=NODELAY,  # as a real device should: no Nagle delay on each publish
    )


def frame_props(frame_id: str, *, protobuf: bool = False) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = frame_id.encode()
    if protobuf:
        props.ContentType = "application/x-protobuf"
    return props


async def flood_until_cut(
    client: aiomqtt.Client, n: int, *, payload: bytes, device_id: str = "cam-flood"
) -> int:
    """Publish up to ``n`` frames (QoS 1) as ``device_id``; how many went out before the
    broker closed the connection (which this waits for, up to 30 s)."""
    sent = 0
    with contextlib.suppress(aiomqtt.MqttError):
        for i in range(n):
            await client.publish(
                f"devices/{device_id}/frames", payload, qos=1, properties=frame_props(f"f{i}")
            )
            sent += 1
        async with asyncio.timeout(30):
            async for _ in client.messages:  # ends when the broker closes the connection
                pass
    return sent


def cli_tls_args(identity: pki.IdentityFiles, port: int) -> list[str]:
    """``mosquitto_pub``/``mosquitto_sub`` options for ``identity`` on ``port`` (MQTT 5)."""
    return [
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--cafile",
        str(identity.ca_bundle),
        "--cert",
        str(identity.chain),
        "--key",
        str(identity.key),
        "-V",
        "mqttv5",
    ]


def front_door(
    engine: Any,
    *,
    gateway_id: str = "gw-mqtt",
    events: EventHub | None = None,
    revocation: RevocationState | None = None,
    **kwargs: Any,
) -> FrontDoor:
    """A front door on ``engine`` for a bridge under test: every device type admitted."""
    return FrontDoor(
        gateway_id=gateway_id, engine=engine, events=events, revocation=revocation, **kwargs
    )


class FakeEngine:
    """A stand-in for the inference engine at our own seam: 'cat' for any JPEG/PNG.

    Counts calls per image so tests can assert a frame was not run twice; ``delay_s`` makes a
    frame take a while (to have frames in flight when the broker is killed).
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ) -> tuple[InferenceResult, None]:
        if not image.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")):
            raise InvalidImage("not a JPEG or PNG image")
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        started = time.monotonic()
        result = InferenceResult(
            detections=(Detection("Cat", 0, 0.9, Box(0.1, 0.1, 0.9, 0.9)),),
            model_name="fake",
            model_version="1",
            inference_ms=(time.monotonic() - started) * 1000,
            from_cache=False,
            width=10,
            height=10,
        )
        return result, None


async def collect(client: aiomqtt.Client, *, count: int, timeout_s: float) -> list[aiomqtt.Message]:
    """Up to ``count`` messages within ``timeout_s`` (fewer if the time runs out)."""
    got: list[aiomqtt.Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                got.append(message)
                if len(got) >= count:
                    break
    return got


# -- a whole gateway with its [mqtt] table ---------------------------------------------------


@dataclass
class MqttGateway:
    """A running :class:`gateway._service.GatewayService` whose ``[mqtt]`` table started the
    managed broker and the bridge, the way ``edgeward gateway run`` does.

    Standalone (``core`` not given): the gateway's ``pki_dir`` is a PKI of the test's own,
    so its registry is what the revocation poller, the device directory and the CRL read.
    With a core: the core's registry holds the devices and pushes revocations.
    """

    service: Any
    pki_dir: Path
    registry: pki.Registry
    port: int
    base: Path

    def device(
        self, device_id: str, *, device_type: str = "pet-camera", region: str = "home"
    ) -> pki.IdentityFiles:
        """A device certificate from the PKI, the device and certificate in the registry."""
        now = dt.datetime.now(dt.UTC)
        self.registry.upsert_device(device_id, type=device_type, region=region, now=now)
        identity = pki.issue_identity(
            self.pki_dir, self.base / f"device-{device_id}", role=pki.Role.DEVICE, id=device_id
        )
        cert = identity.certificate()
        self.registry.record_certificate(
            pki.CertificateRecord(
                pki.serial_hex(cert.serial_number),
                device_id,
                cert.not_valid_after_utc,
                pki.Status.ACTIVE,
                cert.not_valid_before_utc,
            )
        )
        return identity

    def revoke(self, device_id: str) -> None:
        """Revoke in the registry, as ``edgeward pki revoke`` does."""
        pki.revoke_device(self.registry, device_id, reason="test", now=dt.datetime.now(dt.UTC))


def standalone_pki(base: Path, trust_domain: str = "test.example") -> Path:
    """A PKI of the test's own under ``base`` (its registry is the gateway's)."""
    pki_dir = base / "pki"
    if not pki_dir.exists():
        pki.init_pki(pki_dir, trust_domain=trust_domain)
    return pki_dir


def mqtt_gateway_settings(
    base: Path,
    *,
    pki_dir: Path,
    gateway_id: str = "gw-mqtt-svc",
    mqtt: dict[str, Any] | None = None,
    core_address: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Settings (as a dict, for a TOML file or ``load_gateway_settings``) of a test gateway."""
    from gateway import free_port

    identity = pki.issue_identity(
        pki_dir,
        base / f"gateway-{gateway_id}",
        role=pki.Role.GATEWAY,
        id=gateway_id,
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
    )
    values: dict[str, Any] = {
        "identity_dir": str(identity.directory),
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "revocation_poll_interval_s": 0.05,
        "core_timeout_s": 5.0,
        "shutdown_grace_s": 1.0,
        "inference": {"models_dir": str(MODELS_DIR), "threads": 1},
        "cache": {"enabled": False},
        "limits": {"frames_per_s": 1000.0, "burst": 1000},
        "mqtt": {
            "port": free_port(),
            "bridge_port": free_port(),
            "data_dir": str(base / f"mqtt-{gateway_id}"),
            "telemetry_workers": 0,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **(mqtt or {}),
        },
    }
    if core_address is None:
        values["pki_dir"] = str(pki_dir)
    else:
        values["core_address"] = core_address
    values.update(overrides)
    return values


@contextlib.asynccontextmanager
async def mqtt_gateway(
    base: Path,
    *,
    gateway_id: str = "gw-mqtt-svc",
    mqtt: dict[str, Any] | None = None,
    core: Any = None,
    **overrides: Any,
) -> AsyncIterator[MqttGateway]:
    """A ``GatewayService`` started from settings with an ``[mqtt]`` table (see MqttGateway)."""
    from gateway import GatewayService, load_gateway_settings

    pki_dir = core.pki_dir if core is not None else standalone_pki(base)
    values = mqtt_gateway_settings(
        base,
        pki_dir=pki_dir,
        gateway_id=gateway_id,
        mqtt=mqtt,
        core_address=core.address if core is not None else None,
        **overrides,
    )
    settings = load_gateway_settings(None, overrides=values)
    registry: pki.Registry
    own: pki.SqliteRegistry | None = None
    if core is not None:
        registry = core.registry
    else:
        registry = own = pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry)
    try:
        async with GatewayService(settings) as service:
            yield MqttGateway(service, pki_dir, registry, values["mqtt"]["port"], base)
    finally:
        if own is not None:
            own.close()
