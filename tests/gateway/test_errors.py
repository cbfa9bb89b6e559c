"""One error tree for the gateway and the core, one mapping to what a caller is told.

The mapping (:func:`gateway._status.status_of`) is checked for every class of the tree and
the PKI's, so a new error cannot slip through as INTERNAL unnoticed; the wire constants come
from one place; ``import gateway.errors`` stays light (checked in a fresh interpreter).
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import pki
from gateway import Status, status_of
from gateway import errors as e
from gateway._core._status import status_for
from protos.edgeward.v1 import wire

ROOT = Path(__file__).resolve().parents[2]


def test_every_gateway_and_core_error_is_under_the_one_root() -> None:
    classes = [c for _, c in inspect.getmembers(e, inspect.isclass) if c.__module__ == e.__name__]
    assert len(classes) == len(e.__all__)
    assert all(issubclass(c, e.GatewayError) for c in classes)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("gateway._core._status", "PermissionDenied"),
        ("gateway._core._status", "RequestError"),
        ("gateway._core._status", "Unauthenticated"),
        ("gateway._escalation", "CoreUnavailable"),
        ("gateway._escalation", "OutboxFull"),
        ("gateway._inference", "InvalidImage"),
        ("gateway._inference", "ModelIntegrityError"),
        ("gateway._inference", "Overloaded"),
        ("gateway._settings", "ConfigError"),
        ("gateway._telemetry", "InvalidTelemetry"),
        ("gateway._wire", "ListenError"),
    ],
)
def test_the_lower_layers_raise_the_trees_classes(module: str, name: str) -> None:
    """The names the gateway's and the core's modules raise are the classes of
    ``gateway.errors`` (re-exported), not look-alikes of their own."""
    cls = getattr(importlib.import_module(module), name)
    assert cls.__module__ == e.__name__, cls
    assert issubclass(cls, e.GatewayError), cls


def test_importing_the_errors_loads_nothing_heavy() -> None:
    code = "import json, sys\nimport gateway.errors\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout))
    heavy = {"onnxruntime", "numpy", "grpc", "PIL", "cryptography", "pydantic", "pki"}
    assert loaded & heavy == set()
    assert sorted(m for m in loaded if m.startswith("gateway")) == ["gateway", "gateway.errors"]


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (e.InvalidImage("not a JPEG or PNG image"), "INVALID_ARGUMENT", "invalid_image"),
        (e.Overloaded(8), "RESOURCE_EXHAUSTED", "overloaded"),
        (e.DeadlineExceeded("late"), "DEADLINE_EXCEEDED", "deadline"),
        (e.ShuttingDown("bye"), "UNAVAILABLE", "shutting_down"),
        (e.ProviderUnavailable("no cuda"), "UNAVAILABLE", "inference"),
        (e.FeedStale(99.0), "UNAVAILABLE", "feed_stale"),
        (e.RegistryUnavailable("down"), "UNAVAILABLE", "registry"),
        (e.Unauthenticated("no cert"), "UNAUTHENTICATED", "unauthenticated"),
        (e.PermissionDenied("no"), "PERMISSION_DENIED", "not_allowed"),
        (e.DeviceRevoked("cam-1", "ab"), "PERMISSION_DENIED", "revoked"),
        (e.RateLimited("cam-1", 0.5), "RESOURCE_EXHAUSTED", "rate_limited"),
        (e.TooManyStreams("cam-1", 4), "RESOURCE_EXHAUSTED", "too_many_streams"),
        (e.InvalidRequest("bad"), "INVALID_ARGUMENT", "invalid_request"),
        (e.InvalidTelemetry("battery"), "INVALID_ARGUMENT", "invalid_telemetry"),
        (e.StreamIdle(60), "DEADLINE_EXCEEDED", "idle"),
        (e.ConfigError("bad key"), "INTERNAL", "config"),
        (e.CallerUnauthenticated("use mTLS"), "UNAUTHENTICATED", "unauthenticated"),
        (e.CallerNotAllowed("gateways only"), "PERMISSION_DENIED", "not_allowed"),
        (e.NotFound("no such device"), "NOT_FOUND", "not_found"),
        (e.Unimplemented("off"), "UNIMPLEMENTED", "unimplemented"),
        (e.InvalidArgument("bad crop"), "INVALID_ARGUMENT", "invalid_argument"),
        (e.ResourceExhausted("busy"), "RESOURCE_EXHAUSTED", "busy"),
        (pki.TokenRejected("unknown"), "PERMISSION_DENIED", "token_rejected"),
        (pki.RateLimited(30.0), "RESOURCE_EXHAUSTED", "rate_limited"),
        # A registry database that is away is retryable (another core replica may answer).
        (pki.RegistryUnavailable("db down"), "UNAVAILABLE", "registry_unavailable"),
        (pki.RegistryError("refused"), "FAILED_PRECONDITION", "registry"),
        (RuntimeError("bug"), "INTERNAL", "internal"),
    ],
)
def test_each_error_maps_to_its_status(exc: BaseException, code: str, reason: str) -> None:
    status = status_of(exc)
    assert (status.code, status.reason) == (code, reason)
    assert status.grpc_code is grpc.StatusCode[code]
    # The core's servicers use the same mapping.
    assert status_for(exc) == (status.grpc_code, status.message, status.trailing_metadata)


def test_revoked_is_final_and_says_so() -> None:
    status = status_of(e.DeviceRevoked("cam-1"))
    assert dict(status.trailing_metadata) == {wire.FINAL_METADATA_KEY: wire.FINAL_REVOKED}
    assert "re-enrol" in status.message
    assert status_of(e.PermissionDenied("no")).trailing_metadata == ()
    expired = status_of(
        pki.CertificateExpired("old", not_after=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    )
    assert dict(expired.trailing_metadata) == {wire.FINAL_METADATA_KEY: wire.FINAL_EXPIRED}


def test_retry_after_is_one_trailer_in_seconds_on_both_planes() -> None:
    edge = status_of(e.RateLimited("cam-1", 0.25))
    core = status_of(pki.RateLimited(30.0))
    assert dict(edge.trailing_metadata) == {wire.RETRY_AFTER_METADATA_KEY: "0.250"}
    assert dict(core.trailing_metadata) == {wire.RETRY_AFTER_METADATA_KEY: "30.000"}


def test_unauthenticated_says_little_to_the_caller() -> None:
    status = status_of(e.Unauthenticated("certificate outside its validity period"))
    assert status.message == "not authenticated"
    assert "validity" not in json.dumps([status.message, status.trailing_metadata])


def test_status_is_the_public_names() -> None:
    import gateway

    assert gateway.status_of is status_of
    assert gateway.Status is Status
