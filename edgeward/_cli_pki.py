"""``edgeward pki``: the certificate authority, tokens, revocation, CRL, listing, migration.

Every command works on a PKI directory (``--dir``) and its registry: the SQLite file inside it,
or the one ``--registry`` names (a path, ``sqlite:///PATH`` or ``postgresql://…``, also read
from ``EDGEWARD_PKI_REGISTRY``); the URL's password is never printed. Errors print as
one line (no traceback, no secret) and exit non-zero. Audit lines go to stderr; the token that
``pki token`` prints is the only thing on stdout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import getpass
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

import pki as pkilib
from edgeward._logging import configure_logging

__all__ = ["one_line_errors", "pki", "validated_id"]

F = TypeVar("F", bound=Callable[..., Any])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def one_line_errors(fn: F) -> F:
    """Turn the errors a user can cause into a one-line message and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (pkilib.PkiError, ValueError, OSError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise click.ClickException(text) from None

    return wrapper  # type: ignore[return-value]


def validated_id(kind: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback refusing ids outside the pattern (MQTT wildcards, '/', NUL, upper case)."""

    def check(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            if kind == "device type":
                return pkilib.validate_device_type(value)
            return pkilib.validate_id(value, kind=kind)
        except pkilib.InvalidName as exc:
            raise click.BadParameter(exc.reason, param=param) from None

    return check


_DIR = click.option(
    "--dir",
    "pki_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="PKI directory",
)


_REGISTRY = click.option(
    "--registry",
    "registry_url",
    envvar="EDGEWARD_PKI_REGISTRY",
    metavar="URL",
    help="registry: a path, sqlite:///PATH or postgresql://USER@HOST/DB "
    "(default: the SQLite file in DIR)",
)


@contextlib.contextmanager
def _registry(pki_dir: Path, url: str | None) -> Iterator[pkilib.CoreRegistry]:
    registry = pkilib.open_registry(url or pkilib.PkiLayout(pki_dir).registry)
    try:
        yield registry
    finally:
        registry.close()


@click.group("pki")
def pki() -> None:
    """Certificate authority, enrolment tokens, revocation, CRL."""
    configure_logging(level="info")


@pki.command("init")
@_DIR
@click.option("--trust-domain", required=True, help="DNS-like name, e.g. home.example")
@one_line_errors
def init_cmd(pki_dir: Path, trust_domain: str) -> None:
    """Create the root, the issuing CA and the device issuing CA; refuses to overwrite."""
    layout = pkilib.init_pki(pki_dir, trust_domain=trust_domain)
    pkilib.SqliteRegistry(layout.registry).close()
    click.echo(f"PKI for {trust_domain} created in {pki_dir}")
    click.echo(f"  CA bundle (give it to devices): {layout.ca_bundle}")
    click.echo(f"  root key (keep offline):        {layout.root_key}")


@pki.command("add-device-ca")
@_DIR
@one_line_errors
def add_device_ca_cmd(pki_dir: Path) -> None:
    """Give a PKI made by an older edgeward its device issuing CA (needs the root key).

    Devices enrolled before must enrol again; gateways need the new ca-bundle.pem.
    """
    layout = pkilib.add_device_ca(pki_dir)
    click.echo(f"device issuing CA created in {layout.device_cert.parent}")
    click.echo(f"  new CA bundle (give it to gateways and devices): {layout.ca_bundle}")
    click.echo("  devices enrolled before must enrol again: device listeners refuse them")


@pki.command("issue-server")
@_DIR
@_REGISTRY
@click.option("--id", "server_id", required=True, callback=validated_id("server id"))
@click.option("--role", type=click.Choice(["gateway", "core"]), required=True)
@click.option("--dns", multiple=True, help="DNS name for the certificate (repeatable)")
@click.option("--ip", multiple=True, help="IP address for the certificate (repeatable)")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="identity directory (default DIR/servers/<role>-<id>)",
)
@one_line_errors
def issue_server_cmd(
    *,
    pki_dir: Path,
    server_id: str,
    role: str,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    out: Path | None,
    registry_url: str | None,
) -> None:
    """Issue a server certificate (serverAuth + clientAuth) for a gateway or core.

    The certificate is recorded in the registry first, so that 'pki revoke' can revoke it.
    Refused when a device (enrolled or with an unused token) or the other server role holds
    the id: ids are unique across roles.
    """
    for address in ip:
        ipaddress.ip_address(address)  # ValueError: one clear line
    for name in dns:
        if not name or any(c in name for c in "/+# \x00") or name != name.lower():
            raise click.BadParameter(f"{name!r} is not a lower-case DNS name", param_hint="--dns")
    target = out or pkilib.PkiLayout(pki_dir).servers / f"{role}-{server_id}"
    pkilib.CertificateAuthority.load(pki_dir)  # a clear error when DIR is not a PKI
    with _registry(pki_dir, registry_url) as registry:
        files = pkilib.issue_identity(
            pki_dir,
            target,
            role=pkilib.Role(role),
            id=server_id,
            dns_names=dns,
            ip_addresses=ip,
            registry=registry,
        )
    cert = files.certificate()
    click.echo(
        f"{role} {server_id}: serial {pkilib.serial_hex(cert.serial_number)}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, written to {target}"
    )


@pki.command("token")
@_DIR
@_REGISTRY
@click.option("--device-id", required=True, callback=validated_id("device id"))
@click.option("--type", "device_type", required=True, callback=validated_id("device type"))
@click.option("--region", required=True, callback=validated_id("region"))
@click.option("--ttl", default="24h", show_default=True, help="lifetime: 15m, 24h, 7d …")
@one_line_errors
def token_cmd(
    *,
    pki_dir: Path,
    device_id: str,
    device_type: str,
    region: str,
    ttl: str,
    registry_url: str | None,
) -> None:
    """Create a one-time enrolment token; it is printed once and only its hash is stored.

    Earlier unused tokens for the device id stop working. Refused when a gateway or core holds
    the id. Enrolling with it replaces the device's current certificates (they are revoked).
    """
    lifetime = pkilib.parse_ttl(ttl)
    pkilib.CertificateAuthority.load(pki_dir)  # a clear error when DIR is not a PKI
    with _registry(pki_dir, registry_url) as registry:
        token = pkilib.create_token(
            registry,
            device_id=device_id,
            device_type=device_type,
            region=region,
            ttl=lifetime,
            now=_now(),
        )
    click.echo(token)


@pki.command("operator-token")
@_DIR
@_REGISTRY
@click.option("--name", required=True, callback=validated_id("operator name"))
@click.option("--role", type=click.Choice(["viewer", "admin"]), required=True)
@click.option("--ttl", default="10m", show_default=True, help="lifetime: 90s, 10m, 1h (at most 1d)")
@one_line_errors
def operator_token_cmd(
    pki_dir: Path, name: str, role: str, ttl: str, registry_url: str | None
) -> None:
    """Create a one-time console login token for operator NAME; printed once, hash stored.

    The operator's role (viewer: look; admin: also revoke and issue tokens) is recorded in the
    registry. Refused when a device, gateway or core holds the name. Exchange it at the
    console's /login page for a session.
    """
    lifetime = pkilib.parse_ttl(ttl)
    pkilib.CertificateAuthority.load(pki_dir)  # a clear error when DIR is not a PKI
    with _registry(pki_dir, registry_url) as registry:
        token = pkilib.create_operator_token(
            registry, name=name, role=role, ttl=lifetime, now=_now()
        )
    click.echo(token)


def _cli_user() -> str:
    """Who ran the command, for the audit line (the login name; the console names its
    operator instead)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _revoked_text(record: pkilib.RevocationRecord) -> str:
    owner = (
        record.device_id
        if record.role is pkilib.Role.DEVICE
        else f"{record.role.value} {record.device_id}"
    )
    what = f"certificate {record.serial} of {owner}" if record.serial else owner
    return f"revoked {what} (sequence {record.sequence})"


@pki.command("revoke")
@_DIR
@_REGISTRY
@click.option("--device-id", callback=validated_id("device id"))
@click.option("--gateway-id", callback=validated_id("gateway id"))
@click.option("--serial", help="hex serial of one certificate (a device's, gateway's or core's)")
@click.option("--operator", callback=validated_id("operator name"), help="a console operator")
@click.option("--reason", default="revoked by operator", show_default=True)
@click.option("--force", is_flag=True, help="with --operator: revoke even the last admin")
@one_line_errors
def revoke_cmd(
    *,
    pki_dir: Path,
    device_id: str | None,
    gateway_id: str | None,
    serial: str | None,
    operator: str | None,
    reason: str,
    force: bool,
    registry_url: str | None,
) -> None:
    """Revoke a device (all its certificates), a gateway (all its recorded certificates), one
    certificate, or a console operator (its role, unused login tokens and recorded
    certificates; its console sessions end, at the core and at every gateway). Gateways hear
    of device and operator revocations at once; the core refuses a revoked gateway at once.
    Revoking the last active admin operator is refused unless --force."""
    targets = (device_id, gateway_id, serial, operator)
    if sum(v is not None for v in targets) != 1:
        raise click.UsageError(
            "give exactly one of --device-id, --gateway-id, --serial and --operator"
        )
    if force and operator is None:
        raise click.UsageError("--force applies to --operator only")
    if serial is not None:
        try:
            int(serial.strip().removeprefix("0x"), 16)
        except ValueError:
            raise click.BadParameter("not a hex serial", param_hint="--serial") from None
    pkilib.CertificateAuthority.load(pki_dir)
    with _registry(pki_dir, registry_url) as registry:
        if device_id is not None:
            records = [pkilib.revoke_device(registry, device_id, reason=reason, now=_now())]
        elif gateway_id is not None:
            records = pkilib.revoke_server(
                registry, pkilib.Role.GATEWAY, gateway_id, reason=reason, now=_now()
            )
            if not records:
                click.echo(f"every certificate of gateway {gateway_id} was already revoked")
        elif serial is not None:
            records = [pkilib.revoke_serial(registry, serial, reason=reason, now=_now())]
        elif operator is not None:
            records = pkilib.revoke_operator(
                registry, operator, reason=reason, now=_now(), by=_cli_user(), force=force
            )
        else:  # pragma: no cover - excluded by the check above
            raise click.UsageError("give exactly one target")
    for record in records:
        click.echo(_revoked_text(record))


@pki.command("crl")
@_DIR
@_REGISTRY
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--der",
    is_flag=True,
    help="write DER: FILE gets the issuing CA's CRL, FILE with '-device' before its suffix the "
    "device CA's",
)
@one_line_errors
def crl_cmd(pki_dir: Path, out: Path, der: bool, registry_url: str | None) -> None:
    """Write the current CRLs: the device CA's (devices) and the issuing CA's (gateways, cores).

    PEM (default): both in FILE, one after the other, as Mosquitto's crlfile reads them.
    """
    ca = pkilib.CertificateAuthority.load(pki_dir)
    with _registry(pki_dir, registry_url) as registry:
        crls = pkilib.build_crl(ca, registry, now=_now())
    if der:
        device_out = out.with_name(f"{out.stem}-device{out.suffix}")
        pkilib.write_atomic(out, pkilib.crl_bytes(crls.issuing, der=True))
        pkilib.write_atomic(device_out, pkilib.crl_bytes(crls.device, der=True))
        written = f"{out} (gateways, cores) and {device_out} (devices)"
    else:
        pkilib.write_atomic(out, pkilib.crl_bytes(crls))
        written = str(out)
    click.echo(
        f"CRLs with {len(crls.device)} device and {len(crls.issuing)} gateway/core "
        f"certificate(s) written to {written}"
    )


@pki.command("list")
@_DIR
@_REGISTRY
@one_line_errors
def list_cmd(pki_dir: Path, registry_url: str | None) -> None:
    """Devices and their certificates, then gateway and core certificates."""
    pkilib.CertificateAuthority.load(pki_dir)
    with _registry(pki_dir, registry_url) as registry:
        devices = registry.list_devices()
        certs = registry.list_certificates()
        servers = registry.list_server_certificates()
    click.echo(f"{'DEVICE':<24} {'TYPE':<16} {'REGION':<12} {'STATUS':<8} CREATED")
    for d in devices:
        click.echo(
            f"{d.id:<24} {d.type:<16} {d.region:<12} {d.status.value:<8} "
            f"{d.created_at:%Y-%m-%d %H:%M}"
        )
    click.echo("")
    click.echo(f"{'SERIAL':<42} {'DEVICE':<24} {'STATUS':<8} NOT AFTER")
    for c in certs:
        click.echo(
            f"{c.serial:<42} {c.device_id:<24} {c.status.value:<8} {c.not_after:%Y-%m-%d %H:%M}"
        )
    click.echo("")
    click.echo(f"{'SERIAL':<42} {'SERVER':<24} {'STATUS':<8} NOT AFTER")
    for sc in servers:
        owner = f"{sc.role.value}/{sc.server_id}"
        click.echo(
            f"{sc.serial:<42} {owner:<24} {sc.status.value:<8} {sc.not_after:%Y-%m-%d %H:%M}"
        )


@pki.command("migrate")
@_DIR
@click.option("--to", "target", required=True, metavar="URL", help="postgresql://USER@HOST/DB")
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite registry to move (default: the one in DIR)",
)
@click.option("--force", is_flag=True, help="replace what the target registry already holds")
@one_line_errors
def migrate_cmd(pki_dir: Path, target: str, source: Path | None, force: bool) -> None:
    """Move an SQLite registry into PostgreSQL, verifying the row count of every table.

    Stop the core first (or accept that what it writes meanwhile is not moved). A target that
    already holds data is refused unless --force. Nothing is written unless every count matches.
    """
    if not pkilib.is_postgres_url(target):
        raise click.BadParameter("must be a postgresql:// URL", param_hint="--to")
    pkilib.CertificateAuthority.load(pki_dir)
    path = source or pkilib.PkiLayout(pki_dir).registry
    with contextlib.closing(pkilib.PostgresRegistry(target)) as registry:
        report = pkilib.migrate_registry(path, registry, replace=force)
    counts = ", ".join(f"{table} {n}" for table, n in report.counts.items())
    click.echo(
        f"registry {path} moved to {pkilib.redacted_url(target)}: {counts}; "
        f"revocation sequence {report.last_sequence}; counts verified"
    )
