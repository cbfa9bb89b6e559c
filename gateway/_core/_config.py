"""Configuration of the core service (``edgeward core run``).

One TOML file; every key can be overridden by ``EDGEWARD_CORE_<KEY>`` (nested keys joined by
``__``, e.g. ``EDGEWARD_CORE_TOKEN_ATTEMPTS__BURST=5``). Loaded with
:func:`gateway._settings.load_settings`, which names each bad key in its error.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import pki
from gateway._core._escalate import CoreEscalationSettings
from gateway._settings import ServiceSettings, load_settings

__all__ = [
    "ENV_PREFIX",
    "CoreSettings",
    "StaticGateway",
    "TokenAttempts",
    "load_core_settings",
    "split_address",
]

ENV_PREFIX = "EDGEWARD_CORE_"


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); ValueError when malformed."""
    host, sep, port_s = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_s.isdigit() or len(value) > 255:
        raise ValueError(f"{value!r} is not HOST:PORT")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    if any(c.isspace() or c in "/#+\x00" for c in host):
        raise ValueError(f"{host!r} is not a host name or address")
    return host, port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TokenAttempts(BaseModel):
    """Rate limit on failed enrolment-token attempts, per client address (token bucket)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    burst: int = Field(default=10, ge=1, le=10_000, description="failed attempts allowed at once")
    per_minute: float = Field(
        default=10.0, gt=0, le=100_000, description="failed attempts regained per minute"
    )


class StaticGateway(BaseModel):
    """A gateway listed in the signed directory without announcing itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="gateway id (same rules as device ids)")
    region: str = Field(description="region id the gateway serves")
    grpc_address: str = Field(description="HOST:PORT of the gateway's mTLS gRPC endpoint")
    mqtt_address: str = Field(
        default="", description="HOST:PORT of its mTLS MQTT listener, or empty"
    )

    @field_validator("id", "region")
    @classmethod
    def _ids(cls, v: str) -> str:
        return pki.validate_id(v)

    @field_validator("grpc_address")
    @classmethod
    def _grpc(cls, v: str) -> str:
        split_address(v)
        return v

    @field_validator("mqtt_address")
    @classmethod
    def _mqtt(cls, v: str) -> str:
        if v:
            split_address(v)
        return v


class CoreSettings(ServiceSettings):
    """Everything ``edgeward core run`` needs."""

    pki_dir: Path = Field(description="PKI directory made by 'edgeward pki init'")
    core_id: str = Field("core-1", description="this core's id (its certificate: core/<id>)")
    listen: str = Field(
        "127.0.0.1:7443",
        description="HOST:PORT of the mutual-TLS port: Renew, Core API, health",
    )
    enrol_listen: str | None = Field(
        None,
        description="HOST:PORT of the server-authenticated enrolment port (Enroll, "
        "GetCACertificates, GetCrl, health); default: listen's port + 1 (0 stays 0)",
    )
    metrics_listen: str | None = Field(
        "127.0.0.1:9465",
        description="HOST:PORT of the Prometheus endpoint (/metrics, plain HTTP: keep it on "
        "loopback or a private network); port 0: a free port",
    )
    identity_dir: Path | None = Field(
        None,
        description="the core's own identity directory; default PKI_DIR/servers/core-<id>, "
        "issued at start when missing, expiring or not naming the listen addresses",
    )
    registry: str | None = Field(
        None,
        description="the registry: an SQLite file (path or sqlite:///PATH) or a PostgreSQL URL "
        "(postgresql://USER:PASSWORD@HOST:PORT/DB, for replicated cores); default: PKI_DIR's "
        "SQLite file. The password is never logged; prefer a libpq password file or "
        "PGPASSWORD over one in the URL",
    )
    server_names: list[str] = Field(
        default_factory=list,
        description="extra DNS names or IP addresses for the core's server certificate",
    )
    device_certificate_lifetime: dt.timedelta = Field(
        pki.DEFAULT_DEVICE_LIFETIME,
        description="lifetime of device certificates (seconds or ISO 8601 duration)",
    )
    token_attempts: TokenAttempts = Field(
        TokenAttempts(), description="failed token attempts per client address"
    )
    feed_heartbeat_s: float = Field(
        5.0, gt=0, le=3600, description="heartbeat interval on the revocation feed"
    )
    feed_poll_s: float = Field(
        0.05,
        gt=0,
        le=300,
        description="how often the registry is polled for revocations made by other processes; "
        "a PostgreSQL registry pushes them at once (LISTEN/NOTIFY) and polling is only its "
        "safety net, so 1-5 s is enough there",
    )
    grpc_max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="largest gRPC request accepted (escalation crops need the most)",
    )
    crl_validity: dt.timedelta = Field(
        dt.timedelta(hours=24), description="nextUpdate of served CRLs, from their build time"
    )
    gateways: list[StaticGateway] = Field(
        default_factory=list, description="static entries of the signed gateway directory"
    )
    shutdown_grace_s: float = Field(
        5.0, ge=0, le=300, description="time open calls get to finish on shutdown"
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    console_enabled: bool = Field(
        True, description="serve the operator console (HTTPS, operator login) on console_listen"
    )
    console_listen: str = Field(
        "127.0.0.1:9443",
        description="HOST:PORT of the operator console (TLS with the core's certificate; "
        "every page needs an operator login); port 0: a free port",
    )
    console_session_ttl_s: float = Field(
        900.0, ge=30, le=86_400, description="console sessions end after this long idle"
    )
    console_session_max_age_s: float = Field(
        8 * 3600.0, ge=60, le=7 * 86_400, description="console sessions end this long after login"
    )
    console_max_body_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest console request body"
    )
    console_gateways: dict[str, str] = Field(
        default_factory=dict,
        description="gateway id = base URL of that gateway's console (https://HOST:PORT): the "
        "fleet's live views, opened with a one-time link signed by the issuing CA",
    )
    console_gateways_internal: dict[str, str] = Field(
        default_factory=dict,
        description="gateway id = base URL at which the core itself reaches that console to "
        "read its figures (mutual TLS), where it differs from what browsers open (a container "
        "network); default: console_gateways",
    )
    escalation: CoreEscalationSettings | None = Field(
        None,
        description="[escalation] table: Core.Escalate's models, thresholds and bounds; "
        "absent = Escalate answers UNIMPLEMENTED",
    )

    @field_validator("registry", mode="before")
    @classmethod
    def _registry(cls, v: object) -> object:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, str) and "://" in v:
            scheme = v.split("://", 1)[0].lower()
            if scheme not in {"postgresql", "postgres", "sqlite"}:
                # Never echo the value: it may carry a password.
                raise ValueError("must be a file path, sqlite:///PATH or postgresql://…")
        return v

    @field_validator("core_id")
    @classmethod
    def _core_id(cls, v: str) -> str:
        return pki.validate_id(v, kind="core id")

    @field_validator("console_gateways", "console_gateways_internal")
    @classmethod
    def _console_gateways(cls, v: dict[str, str]) -> dict[str, str]:
        for gateway_id, url in v.items():
            pki.validate_id(gateway_id, kind="gateway id")
            if not url.startswith("https://") or any(c in url for c in " #?\x00\n"):
                raise ValueError(f"{url!r} is not an https://HOST:PORT URL")
        return v

    @field_validator("listen", "enrol_listen", "metrics_listen", "console_listen")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            split_address(v)
        return v

    @field_validator("server_names")
    @classmethod
    def _server_names(cls, v: list[str]) -> list[str]:
        # The CA adds core.edgeward.internal itself and refuses every requested name under
        # edgeward.internal; say so at load, naming this key, not at certificate issuance.
        for name in v:
            if pki.is_reserved_dns_name(name):
                raise ValueError(
                    f"{name!r} is reserved (edgeward.internal names are assigned by the CA; "
                    "the core's certificate always carries core.edgeward.internal)"
                )
        return v

    @field_validator("device_certificate_lifetime")
    @classmethod
    def _lifetime(cls, v: dt.timedelta) -> dt.timedelta:
        if not dt.timedelta(minutes=5) <= v <= dt.timedelta(days=365):
            raise ValueError("must be between 5 minutes and 365 days")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return v.lower()

    @property
    def enrol_address(self) -> str:
        """The enrolment port's address, derived from ``listen`` when not set."""
        if self.enrol_listen is not None:
            return self.enrol_listen
        host, port = split_address(self.listen)
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port + 1 if port else 0}"

    @property
    def identity_path(self) -> Path:
        return self.identity_dir or pki.PkiLayout(self.pki_dir).servers / f"core-{self.core_id}"

    @property
    def registry_target(self) -> str | Path:
        """What :func:`pki.open_registry` opens: the configured URL or path, or PKI_DIR's file."""
        return self.registry or pki.PkiLayout(self.pki_dir).registry

    @property
    def registry_display(self) -> str:
        """The registry as it may be logged (no password)."""
        return pki.redacted_url(str(self.registry_target))


def load_core_settings(path: Path | None, **overrides: Any) -> CoreSettings:
    """Load the core's settings: ``overrides`` (flags) > environment > file > defaults."""
    return load_settings(
        CoreSettings,
        path,
        env_prefix=ENV_PREFIX,
        overrides={k: v for k, v in overrides.items() if v is not None},
    )
