"""What a device presents to the broker: its certificate alone, without the device issuing CA.

The device listener holds the device CA as its only anchor, so the intermediate adds nothing
to the check, while the broker parses and keeps every certificate a client sends for the life
of the connection. The SDK's MQTT context therefore sends the leaf alone, checked here by a
real handshake with a server that records what arrived, and the broker still admits exactly
what it admitted before: the device CA is the anchor, never a name that any certificate may
claim as its issuer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import pki
from device_sdk._mqtt import mqtt_ssl_context
from tests._support.mqtt import BrokerHarness, mint_odd_certificate
from tests.conftest import TRUST_DOMAIN, IssueFn

GATEWAY_ID = "gw-mqtt"  # the harness's gateway


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _der_of(pem_file: Path) -> bytes:
    return _der(x509.load_pem_x509_certificate(pem_file.read_bytes()))


def _received_chain(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the client sent, leaf first (``get_unverified_chain``, public from
    Python 3.13; before, the same method on the underlying ``_ssl`` object)."""
    getter = getattr(obj, "get_unverified_chain", None) or obj._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in getter() or []]  # type: ignore[attr-defined]


@asynccontextmanager
async def _recording_server(
    gateway: pki.IdentityFiles,
) -> AsyncIterator[tuple[int, list[list[bytes]]]]:
    """A TLS server with ``gateway``'s certificate that demands a client certificate of the
    trust domain and records each client's chain as received."""
    seen: list[list[bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(_received_chain(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_ssl_context(gateway))
    async with server:
        yield server.sockets[0].getsockname()[1], seen


async def _sent(port: int, seen: list[list[bytes]], ctx: ssl.SSLContext) -> list[bytes]:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 20
    )
    writer.close()
    for _ in range(200):
        if seen:
            return seen.pop()
        await asyncio.sleep(0.05)
    raise AssertionError("the server saw no handshake")


async def test_the_sdk_presents_its_certificate_alone(issue: IssueFn, pki_dir: Path) -> None:
    gateway = issue("gateway", GATEWAY_ID)
    device = issue("device", "dev-leaf")
    leaf = _der(device.certificate())
    device_ca = _der_of(pki.PkiLayout(pki_dir).device_cert)
    async with _recording_server(gateway) as (port, seen):
        assert await _sent(port, seen, mqtt_ssl_context(device, GATEWAY_ID)) == [leaf]
        # The general client context still presents the chain.
        assert await _sent(port, seen, pki.client_ssl_context(device)) == [leaf, device_ca]
        # Why the SDK's context trusts only the server CAs: with the leaf alone but the whole
        # bundle in its store, OpenSSL completes the chain itself and sends the root as well.
        naive = ssl.create_default_context(cafile=str(device.ca_bundle))
        naive.check_hostname = False
        naive.load_cert_chain(str(device.cert), str(device.key))
        assert len(await _sent(port, seen, naive)) == 3


async def test_the_sdk_context_verifies_the_gateway_without_the_device_ca(
    issue: IssueFn,
) -> None:
    """The trimmed store still demands the gateway's pinned name from the CA of servers."""
    device = issue("device", "dev-pin")
    async with _recording_server(issue("gateway", "gw-other")) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            await _sent(port, seen, mqtt_ssl_context(device, GATEWAY_ID))
    assert not seen


async def test_a_device_of_an_older_pki_still_presents_its_chain(
    issue: IssueFn, pki_dir: Path, tmp_path: Path
) -> None:
    """A certificate the issuing CA signed (devices enrolled before the device CA existed)
    has its issuer among the server CAs: it goes out with its chain, as before."""
    gateway = issue("gateway", GATEWAY_ID)
    old = mint_odd_certificate(
        pki_dir,
        tmp_path / "old-dev",
        common_name="dev-old-pki",
        issuer="issuing",
        uris=(f"spiffe://{TRUST_DOMAIN}/device/dev-old-pki",),
    )
    issuing_ca = _der_of(pki.PkiLayout(pki_dir).issuing_cert)
    async with _recording_server(gateway) as (port, seen):
        sent = await _sent(port, seen, mqtt_ssl_context(old, GATEWAY_ID))
    assert sent == [_der(old.certificate()), issuing_ca]


def _client(ctx: ssl.SSLContext, port: int) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=ctx,
        timeout=5,
    )


async def test_the_broker_admits_a_device_presenting_its_certificate_alone(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "dev-alone")
    async with _client(mqtt_ssl_context(device, GATEWAY_ID), harness.port) as client:
        await client.subscribe("devices/dev-alone/events", qos=1)
        await client.publish("devices/dev-alone/telemetry", b"{}", qos=1, timeout=10)


def _with_our_bundle(files: pki.IdentityFiles, bundle: Path, out: Path) -> pki.IdentityFiles:
    """``files``' certificate and key with this trust domain's CA bundle: a client that trusts
    our gateway, so that only the broker's judgement of the certificate is tested."""
    shutil.copytree(files.directory, out)
    copy = pki.IdentityFiles(out)
    shutil.copyfile(bundle, copy.ca_bundle)
    return copy


Intruder = Callable[[BrokerHarness, IssueFn, IssueFn, Path], pki.IdentityFiles]


def _foreign_device(
    h: BrokerHarness, issue: IssueFn, foreign: IssueFn, tmp: Path
) -> pki.IdentityFiles:
    # Another PKI of the same trust domain: its device CA has the very same name as ours.
    return _with_our_bundle(foreign("device", "dev-foreign"), h.gateway.ca_bundle, tmp / "f")


def _expired(h: BrokerHarness, issue: IssueFn, foreign: IssueFn, tmp: Path) -> pki.IdentityFiles:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    return issue("device", "dev-expired", now=past, lifetime=dt.timedelta(hours=1))


def _gateway(h: BrokerHarness, issue: IssueFn, foreign: IssueFn, tmp: Path) -> pki.IdentityFiles:
    return issue("gateway", "gw-intruder")


def _issuing_ca_device(
    h: BrokerHarness, issue: IssueFn, foreign: IssueFn, tmp: Path
) -> pki.IdentityFiles:
    return mint_odd_certificate(
        h.pki_dir,
        tmp / "wrong-ca",
        common_name="dev-wrong-ca",
        issuer="issuing",
        uris=(f"spiffe://{TRUST_DOMAIN}/device/dev-wrong-ca",),
    )


REFUSED: dict[str, Intruder] = {
    "a device certificate of another PKI's device CA of the same name": _foreign_device,
    "an expired device certificate": _expired,
    "a gateway certificate": _gateway,
    "the device profile from the issuing CA": _issuing_ca_device,
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_the_device_ca_is_the_anchor_not_a_name(
    case: str,
    harness: BrokerHarness,
    issue: IssueFn,
    issue_foreign: IssueFn,
    tmp_path: Path,
) -> None:
    intruder = REFUSED[case](harness, issue, issue_foreign, tmp_path)
    with pytest.raises(aiomqtt.MqttError):
        async with _client(mqtt_ssl_context(intruder, GATEWAY_ID), harness.port):
            pass
    # The same construction with a good certificate gets in: the broker refused the intruder.
    good = _with_our_bundle(issue("device", "dev-good"), harness.gateway.ca_bundle, tmp_path / "g")
    async with _client(mqtt_ssl_context(good, GATEWAY_ID), harness.port):
        pass


async def test_a_revoked_device_presenting_its_certificate_alone_is_refused(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "dev-revoked")
    async with _client(mqtt_ssl_context(device, GATEWAY_ID), harness.port):
        pass
    harness.revoke_serial(device)
    await harness.broker.refresh_crl()
    refused = False
    for _ in range(600):  # SIGHUP is handled on the broker's next loop turn (60 s bound)
        try:
            async with _client(mqtt_ssl_context(device, GATEWAY_ID), harness.port):
                pass
        except aiomqtt.MqttError:
            refused = True
            break
        await asyncio.sleep(0.1)
    assert refused
    async with _client(mqtt_ssl_context(issue("device", "dev-other"), GATEWAY_ID), harness.port):
        pass
