"""The devices' listener admits exactly what the gRPC device listener admits: device
certificates of the device issuing CA. Everything else is refused at the TLS handshake, before
any CONNECT is read or any topic touched, against the real broker with the real clients."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import pki
from gateway import RevocationState
from gateway._grpc._identity import IdentityJudge
from gateway._mqtt import CrlSnapshot, MqttBridge
from gateway.errors import PermissionDenied, Unauthenticated
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    cli_tls_args,
    collect,
    device_client,
    frame_props,
    front_door,
    mint_odd_certificate,
)
from tests.conftest import TRUST_DOMAIN, IssueFn, require_tool

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64
DEVICE_URI = f"spiffe://{TRUST_DOMAIN}/device/"

Make = Callable[[IssueFn, Path, Path], pki.IdentityFiles]


def _issuing(cn: str, **kw: object) -> Make:
    """A certificate signed with the *issuing* CA's key (gateways' and cores' CA)."""

    def make(issue: IssueFn, pki_dir: Path, out: Path) -> pki.IdentityFiles:
        return mint_odd_certificate(
            pki_dir,
            out / cn,
            common_name=cn,
            issuer="issuing",
            **kw,  # type: ignore[arg-type]
        )

    return make


def _with_chain_to_root(issue: IssueFn, pki_dir: Path, out: Path) -> pki.IdentityFiles:
    """A gateway certificate that sends its whole chain: leaf, issuing CA, root."""
    files = issue("gateway", "gw-chain")
    root = pki.PkiLayout(pki_dir).root_cert.read_bytes()
    files.chain.write_bytes(files.chain.read_bytes() + root)
    return files


REFUSED: dict[str, Make] = {
    "gateway certificate": lambda issue, _d, _o: issue("gateway", "gw-intruder"),
    "core certificate": lambda issue, _d, _o: issue("core", "core-intruder"),
    "gateway certificate sending its chain to the root": _with_chain_to_root,
    "no EKU": _issuing("dev-no-eku", uris=(DEVICE_URI + "dev-no-eku",), eku=None),
    "two SPIFFE URIs": _issuing(
        "dev-two-uris", uris=(DEVICE_URI + "dev-two-uris", DEVICE_URI + "dev-other")
    ),
    "gateway-role URI": _issuing(
        "dev-gw-uri", uris=(f"spiffe://{TRUST_DOMAIN}/gateway/dev-gw-uri",)
    ),
    "another trust domain's URI": _issuing(
        "dev-elsewhere", uris=("spiffe://elsewhere.example/device/dev-elsewhere",)
    ),
    "the exact device profile, but from the issuing CA": _issuing(
        "dev-wrong-ca", uris=(DEVICE_URI + "dev-wrong-ca",)
    ),
}


def _cn(files: pki.IdentityFiles) -> str:
    attr = files.certificate().subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0]
    return str(attr.value)


async def _cli(tool: str, files: pki.IdentityFiles, port: int, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        require_tool(tool),
        *cli_tls_args(files, port),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _grpc_admits(files: pki.IdentityFiles, gateway: pki.IdentityFiles) -> bool:
    """What the gRPC device listener's per-call judge, built as the gateway builds it, says of
    the same certificate (its TLS layer admits the whole bundle's chains)."""
    state = RevocationState(max_staleness_s=60)
    judge = IdentityJudge(
        trust_domain=TRUST_DOMAIN,
        revocation=state,
        device_cas=pki.device_ca_certificates(gateway.ca_bundle.read_bytes()),
    )
    try:
        judge.judge({"x509_pem_cert": [files.cert.read_bytes()]})
    except (Unauthenticated, PermissionDenied):
        return False
    return True


@pytest.mark.parametrize("case", list(REFUSED))
async def test_non_device_certificates_are_refused_at_connect(
    case: str, harness: BrokerHarness, issue: IssueFn, pki_dir: Path, tmp_path: Path
) -> None:
    intruder = REFUSED[case](issue, pki_dir, tmp_path / "minted")
    cn = _cn(intruder)
    device = issue("device", "dev-trusted")
    engine = FakeEngine()
    async with (
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(engine, gateway_id="gw-mqtt"),
        ) as bridge,
        device_client(device, harness.port) as real,
    ):
        await bridge.wait_ready()
        # What the intruder tried: publish a frame to "its own" topics and read the answer.
        sub = asyncio.create_task(
            _cli("mosquitto_sub", intruder, harness.port, "-t", f"devices/{cn}/#", "-W", "3")
        )
        code, out = await _cli(
            "mosquitto_pub",
            intruder,
            harness.port,
            *("-t", f"devices/{cn}/frames", "-m", "x", "-q", "1", "-d"),
        )
        assert code != 0, out
        assert "CONNACK" not in out, out
        sub_code, sub_out = await sub
        assert sub_code != 0, sub_out
        assert "devices/" not in sub_out, sub_out
        # Refused at TLS time: the handshake never completes.
        with pytest.raises(aiomqtt.MqttError):
            async with device_client(intruder, harness.port, timeout=1.5):
                pass
        # The real device still works, and only its frame reached the model.
        await real.subscribe("devices/dev-trusted/detections", qos=1)
        await real.publish("devices/dev-trusted/frames", JPEG, qos=1, properties=frame_props("f"))
        assert len(await collect(real, count=1, timeout_s=5)) == 1
    assert engine.calls == 1
    # The same certificate is refused by the gRPC device listener: one rule on both protocols.
    assert not _grpc_admits(intruder, harness.gateway)
    assert _grpc_admits(device, harness.gateway)


async def test_a_device_connects_with_the_mosquitto_clients(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "dev-cli")
    code, out = await _cli(
        "mosquitto_pub",
        device,
        harness.port,
        *("-t", "devices/dev-cli/telemetry", "-m", "{}", "-q", "1", "-d"),
    )
    assert code == 0, out
    assert "CONNACK" in out, out


async def test_listener_trust_files_hold_one_anchor_each(
    harness: BrokerHarness, pki_dir: Path
) -> None:
    """The device listener trusts the device CA alone; the gateway's listener its own CA."""
    layout = pki.PkiLayout(pki_dir)
    files = harness.broker.files
    device_ca = x509.load_pem_x509_certificate(layout.device_cert.read_bytes())
    issuing_ca = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    assert files.device_cafile.read_bytes() == pki.trusted_client_anchor_pem(device_ca)
    assert files.gateway_cafile.read_bytes() == pki.trusted_client_anchor_pem(issuing_ca)
    conf = files.conf.read_text()
    assert f"cafile {files.device_cafile}" in conf
    assert f"cafile {files.gateway_cafile}" in conf
    assert "ca-bundle" not in conf


async def test_broker_refuses_to_start_with_a_bundle_without_device_ca(
    issue: IssueFn, tmp_path: Path
) -> None:
    """A gateway given the CA bundle of an older PKI never falls back to trusting it all."""
    require_tool("mosquitto")
    gateway = issue("gateway", "gw-old-bundle")
    bundle = x509.load_pem_x509_certificates(gateway.ca_bundle.read_bytes())
    old = [c for c in bundle if c not in pki.device_ca_certificates(gateway.ca_bundle.read_bytes())]
    gateway.ca_bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in old))
    h = BrokerHarness(pki_dir=tmp_path, gateway=gateway, data_dir=tmp_path / "mqtt")
    with pytest.raises(pki.PkiNotFound, match="add-device-ca"):
        async with h.run():
            pass


async def test_broker_refuses_crls_it_cannot_enforce(
    issue: IssueFn, pki_dir: Path, other_pki_dir: Path, tmp_path: Path
) -> None:
    """No CRL of the device CA (a core older than the gateway) would make OpenSSL refuse every
    device; a CRL another CA signed would make it refuse everyone: neither is written."""
    require_tool("mosquitto")
    gateway = issue("gateway", "gw-crls")
    ca = pki.CertificateAuthority.load(pki_dir)
    foreign = pki.CertificateAuthority.load(other_pki_dir)  # same trust domain, other keys
    now = dt.datetime.now(dt.UTC)

    async def only_issuing() -> CrlSnapshot:
        return CrlSnapshot((ca.build_crl([], now=now),), 1)

    async def foreign_device_crl() -> CrlSnapshot:
        crls = (ca.build_crl([], now=now), foreign.build_crl([], now=now, devices=True))
        return CrlSnapshot(crls, 1)

    for name, source, error in (
        ("old-core", only_issuing, pki.PkiNotFound),
        ("foreign", foreign_device_crl, pki.SignatureInvalid),
    ):
        h = BrokerHarness(pki_dir=pki_dir, gateway=gateway, data_dir=tmp_path / name)
        h.crl = source  # type: ignore[method-assign]
        with pytest.raises(error):
            async with h.run():
                pass
        assert not (tmp_path / name / "crl.pem").exists()
