"""The public surfaces of ``gateway`` and ``pki``: what ``__all__`` lists exists, is documented
and comes from the package's private modules; the error modules hold one tree each; importing
either package stays light."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import gateway
import gateway.errors
import pki
import pki.errors

ROOT = Path(__file__).resolve().parents[2]


def _check_surface(package: ModuleType) -> None:
    names = package.__all__
    assert len(set(names)) == len(names)
    for name in names:
        member = getattr(package, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__doc__, f"{package.__name__}.{name} has no docstring"
            module = member.__module__
            # Defined behind the surface, in a private module or the errors module.
            assert module.startswith(f"{package.__name__}."), (name, module)
            tail = module.removeprefix(f"{package.__name__}.")
            assert tail.startswith("_") or tail == "errors", (name, module)


#: The gateway package's surface, by who needs it (the package docstring says the same). A
#: name joins deliberately: add it here and to the docs page that covers it.
GATEWAY_SURFACE = {
    # running a gateway
    "GatewayService", "GatewaySettings", "load_gateway_settings", "describe_settings",
    "AuthorisationSettings", "CacheSettings", "InferenceSettings", "LimitsSettings",
    "find_models_dir", "MODELS_NOT_FOUND_HINT", "Status", "status_of",
    # plug-in authors
    "GatewayPlugin", "GatewayRuntime", "FrontDoor", "DetectionHook", "InferenceResult",
    "Detection", "Box",
    "DeviceDirectory", "DeviceInfo", "StaticDeviceDirectory", "TelemetryRecord", "event_to_pb",
    "Command", "DeviceEvent", "ErrorEvent", "EscalationAnswer", "EventHub", "EventPayload",
    "AnsweredObject",
    "GatewayMetrics", "RevocationEvent", "RevocationListener", "RevocationState",
    "MqttSettings", "EscalationSettings", "RegionPolicy",
    # running a core
    "CoreServer", "CoreSettings", "load_core_settings", "EscalateService",
    "CoreEscalationSettings", "EscalateHandler",
    # inference alone, and ports chosen before they are bound
    "InferenceEngine", "ResponseCache", "EngineObserver", "CacheKind", "free_port",
    # errors
    "GatewayError", "ConfigError", "DeviceRevoked", "FeedStale", "PermissionDenied",
    "RateLimited", "Unauthenticated",
}  # fmt: skip


def test_gateway_exported_members() -> None:
    _check_surface(gateway)
    assert set(gateway.__all__) == GATEWAY_SURFACE
    assert sorted(dir(gateway)) == sorted(gateway.__all__)
    # Lazily resolved names are the same objects as in their modules.
    assert (
        gateway.GatewayService
        is __import__("gateway._service", fromlist=["GatewayService"]).GatewayService
    )
    assert gateway.FrontDoor.__module__ == "gateway._door._frontdoor"


#: The PKI package's surface, by what it is for. A name joins (or leaves) deliberately, here.
PKI_SURFACE = {
    # the CA and its files
    "CertificateAuthority", "PkiLayout", "init_pki", "add_device_ca", "device_ca_certificates",
    "server_ca_certificates", "trusted_client_anchor_pem", "serial_hex", "DEFAULT_DEVICE_LIFETIME",
    "DEFAULT_SERVER_LIFETIME", "generate_private_key", "load_private_key", "write_private_key",
    "write_atomic",
    # names, identities and roles
    "Identity", "Role", "ID_PATTERN", "validate_id", "validate_device_type",
    "validate_trust_domain", "parse_spiffe_id", "identity_from_certificate",
    "CORE_SERVER_NAME", "GATEWAY_SERVER_NAME_SUFFIX", "RESERVED_DNS_SUFFIX", "core_server_name",
    "gateway_server_name", "is_reserved_dns_name", "reserved_dns_names",
    "IdentityFiles", "issue_identity", "write_identity",
    # enrolment, tokens and revocation
    "EnrollmentAuthority", "FailureLimiter", "IssuedCertificate", "create_token",
    "revoke_device", "revoke_serial", "revoke_server", "MAX_CSR_BYTES", "load_csr",
    "validate_csr", "MAX_TOKEN_LENGTH", "generate_token", "hash_token", "parse_ttl",
    "token_device_id", "DEFAULT_OPERATOR_TOKEN_TTL", "create_operator_token",
    "redeem_operator_token", "revoke_operator",
    # CRLs and the signed gateway directory
    "CrlSet", "build_crl", "crl_bytes", "DEFAULT_CRL_VALIDITY", "SignedPayload",
    "sign_payload", "verify_signed_payload",
    # TLS recipes
    "AEAD_CIPHERS_TLS12", "client_ssl_context", "server_ssl_context", "server_name_option",
    "grpc_channel_credentials", "grpc_server_credentials",
    # the registry
    "Registry", "CoreRegistry", "OperatorRegistry", "SqliteRegistry", "PostgresRegistry",
    "open_registry", "is_postgres_url", "redacted_url", "MigrationReport", "migrate_registry",
    "CertificateRecord", "DeviceRecord", "EnrolmentRecord", "GatewayRecord", "OperatorRecord",
    "OperatorRole", "RevocationRecord", "ServerCertificateRecord", "TokenRecord", "Status",
    "FleetPage", "FleetRow", "FLEET_STATES", "MAX_FLEET_PAGE",
    # errors
    "PkiError", "InvalidName", "InvalidIdentity", "PkiExists", "PkiNotFound", "InvalidCsr",
    "TokenRejected", "RateLimited", "CertificateRevoked", "CertificateExpired",
    "RegistryError", "IdentityConflict", "LastAdmin", "RegistryUnavailable",
    "SignatureInvalid",
}  # fmt: skip


def test_pki_exported_members() -> None:
    _check_surface(pki)
    assert set(pki.__all__) == PKI_SURFACE
    # Every PKI error is offered by the package itself, the same class, under the one root.
    for name in pki.errors.__all__:
        assert getattr(pki, name) is getattr(pki.errors, name), name
        assert issubclass(getattr(pki.errors, name), pki.PkiError), name


@pytest.mark.parametrize(
    ("errors", "root"), [(gateway.errors, gateway.errors.GatewayError), (pki.errors, None)]
)
def test_each_error_module_holds_one_tree(errors: ModuleType, root: type | None) -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if c.__module__ == errors.__name__ and issubclass(c, BaseException)
    ]
    roots = [c for c in classes if not any(issubclass(c, o) for o in classes if o is not c)]
    assert len(roots) == 1, roots
    if root is not None:
        assert roots == [root]
    for cls in classes:
        assert cls.__doc__, cls


def test_every_exception_the_gateway_defines_is_under_its_root() -> None:
    """Private modules too (a worker's protocol errors, a start-up configuration error): one
    ``except GatewayError`` catches whatever the gateway raises of its own."""
    strays = []
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (
                cls.__module__ == module.__name__
                and issubclass(cls, BaseException)
                and not issubclass(cls, gateway.errors.GatewayError)
            ):
                strays.append(f"{module.__name__}.{name}")
    assert strays == []


def test_the_exported_errors_are_the_error_modules() -> None:
    for package, errors in ((gateway, gateway.errors), (pki, pki.errors)):
        for name in package.__all__:
            member = getattr(package, name)
            if inspect.isclass(member) and issubclass(member, BaseException):
                assert member.__module__ == errors.__name__, name


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        ("import gateway", ("onnxruntime", "numpy", "gateway._grpc", "gateway._mqtt")),
        ("import pki", ("gateway", "device_sdk", "onnxruntime", "numpy")),
    ],
)
def test_importing_the_package_is_light(statement: str, forbidden: tuple[str, ...]) -> None:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f"{f}.") for f in forbidden)]
    assert bad == []
