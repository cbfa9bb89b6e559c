"""What the core publishes, signed by its issuing CA: the gateway directory and the CRL.

Both are rebuilt only when the registry changed (directory version, last revocation sequence)
or the cached copy is getting old, so a burst of enrolments does not sign the same thing again
and again. Both classes are thread-safe: enrolment decisions run in worker threads.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

import pki
from gateway._core._config import StaticGateway
from protos.edgeward.v1 import common_pb2

__all__ = ["CrlPublisher", "DirectoryPublisher"]

Clock = Callable[[], dt.datetime]


def _timestamp(t: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


class DirectoryPublisher:
    """The signed gateway directory: announced gateways plus static entries from config."""

    def __init__(
        self,
        *,
        ca: pki.CertificateAuthority,
        registry: pki.Registry,
        static: Sequence[StaticGateway] = (),
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._registry = registry
        self._static = tuple(static)
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, common_pb2.SignedGatewayDirectory] | None = None

    def current(self) -> common_pb2.SignedGatewayDirectory:
        version = self._registry.directory_version()
        with self._lock:
            if self._cached is not None and self._cached[0] == version:
                return self._cached[1]
            entries: dict[str, common_pb2.GatewayEntry] = {
                g.id: common_pb2.GatewayEntry(
                    gateway_id=g.id,
                    region=g.region,
                    grpc_address=g.grpc_address,
                    mqtt_address=g.mqtt_address,
                )
                for g in self._static
            }
            for g in self._registry.list_gateways():  # announced entries win over static ones
                static = entries.get(g.id)
                entries[g.id] = common_pb2.GatewayEntry(
                    gateway_id=g.id,
                    region=g.region,
                    grpc_address=g.grpc_address,
                    # A gateway that cannot tell its MQTT address keeps the configured one.
                    mqtt_address=g.mqtt_address or (static.mqtt_address if static else ""),
                )
            payload = common_pb2.GatewayDirectoryPayload(
                trust_domain=self._ca.trust_domain,
                version=version,
                issued_at=_timestamp(self._clock()),
                gateways=[entries[k] for k in sorted(entries)],
            )
            signed = pki.sign_payload(self._ca, payload.SerializeToString(deterministic=True))
            message = common_pb2.SignedGatewayDirectory(
                payload=signed.payload,
                signature=signed.signature,
                signer_certificate_pem=signed.signer_certificate_pem.decode(),
            )
            self._cached = (version, message)
            return message


class CrlPublisher:
    """The current CRLs (DER: the issuing CA's, the device CA's) and the revocation sequence
    they reflect."""

    def __init__(
        self,
        *,
        ca: pki.CertificateAuthority,
        registry: pki.Registry,
        validity: dt.timedelta,
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._registry = registry
        self._validity = validity
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, dt.datetime, bytes, bytes] | None = None

    def current(self) -> tuple[bytes, bytes, int]:
        sequence = self._registry.last_sequence()
        now = self._clock()
        with self._lock:
            if self._cached is not None:
                seq, built, issuing, device = self._cached
                # Rebuild at half the validity so clients never hold a CRL past nextUpdate.
                if seq == sequence and now - built < self._validity / 2:
                    return issuing, device, seq
            crls = pki.build_crl(self._ca, self._registry, now=now, validity=self._validity)
            issuing = pki.crl_bytes(crls.issuing, der=True)
            device = pki.crl_bytes(crls.device, der=True)
            self._cached = (sequence, now, issuing, device)
            return issuing, device, sequence
