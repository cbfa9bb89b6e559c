"""``edgeward gateway``: run an edge gateway, print its configuration reference.

``edgeward gateway run --config gateway.toml`` reads the configuration once (file, then
``EDGEWARD_GATEWAY_*`` environment, then the quick-start flags), configures logging, and
serves until SIGTERM or SIGINT; then it stops accepting calls, lets in-flight frames finish
(``shutdown_grace_s``) and exits 0.

Optional components start when their table is present: ``[mqtt]`` (``gateway._mqtt``) and
``[escalation]`` (``gateway._escalation``) are each asked for ``plugin(settings)``, which
validates the table and returns the :data:`gateway.GatewayPlugin` to start (or ``None`` when
the table turns it off). The mechanism is :func:`gateway._service.configured_plugins`, the same
one an embedded ``GatewayService(settings)`` uses; a bad table stops the start-up with an
error naming the key.

Quick start (no ``--config``): a gateway started from flags alone does what the product is for.
With ``--core`` it escalates to that core under the default region policy for its region
(:class:`gateway.RegionPolicy`: an uncertainty band, crops only, faces blurred
before any pixel leaves, a budget per device), and it speaks MQTT when Mosquitto is installed:
the devices' mutual-TLS listener on the gRPC host and port + 1 (the core's enrolment port
follows its listen port the same way). Without Mosquitto it logs one line saying MQTT is off
and why. State goes under ``./var/<identity directory name>/``. A table set through the
environment (``EDGEWARD_GATEWAY_MQTT__ENABLED=false``) wins over these defaults; a
configuration file gets none of them (absent tables stay off).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import click

__all__ = ["gateway"]


@click.group()
def gateway() -> None:
    """Run an edge gateway."""


@gateway.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML configuration file (every key also from EDGEWARD_GATEWAY_*).",
)
@click.option("--listen", default=None, help="host:port of the device gRPC server.")
@click.option(
    "--identity",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="This gateway's identity directory.",
)
@click.option(
    "--core",
    multiple=True,
    help="host:port of the core (revocation feed, registry); repeat it, or give a comma "
    "list, for replicas the gateway fails over between.",
)
@click.option(
    "--pki-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Standalone: the PKI directory whose registry is polled.",
)
@click.option("--metrics-listen", default=None, help="host:port of the Prometheus endpoint.")
@click.option("--region", default=None, help="Region this gateway serves.")
@click.option("--console-listen", default=None, help="host:port of the operator console (HTTPS).")
def run(  # noqa: PLR0917 - click passes options as arguments
    config_path: Path | None,
    listen: str | None,
    identity: Path | None,
    core: tuple[str, ...],
    pki_dir: Path | None,
    metrics_listen: str | None,
    region: str | None,
    console_listen: str | None,
) -> None:
    """Serve devices until SIGTERM/SIGINT, then drain and exit."""
    import pki
    from edgeward._logging import configure_logging
    from gateway import ConfigError, load_gateway_settings
    from gateway.errors import ModelIntegrityError

    # gRPC reads this once when it starts: TLS 1.2 suites are ECDHE with AEAD only
    # (no CBC: LUCKY13, RFC 7457 §2.8). TLS 1.3 suites are all AEAD.
    os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", pki.AEAD_CIPHERS_TLS12)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("listen", listen),
            ("identity_dir", identity),
            ("core_address", _core_option(core)),
            ("pki_dir", pki_dir),
            ("metrics_listen", metrics_listen),
            ("region", region),
            ("console_listen", console_listen),
        )
        if value is not None
    }
    try:
        settings = load_gateway_settings(config_path, overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(level=settings.log_level)
    if config_path is None:
        settings = _quick_start_defaults(settings)
    try:
        asyncio.run(_serve(settings))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except (pki.PkiError, OSError, ModelIntegrityError) as exc:
        raise click.ClickException(f"gateway failed to start: {exc}") from None


def _quick_start_defaults(settings: Any) -> Any:
    """``settings`` with escalation (given a core) and MQTT (given Mosquitto) turned on where
    neither flags nor the environment said anything about them."""
    import structlog

    from gateway import MqttSettings

    log = structlog.get_logger("edgeward.gateway")
    state = Path("var") / settings.identity_dir.name
    update: dict[str, Any] = {}
    if settings.escalation is None and settings.core_address is not None:
        update["escalation"] = {
            "outbox_path": str(state / "escalation-outbox.sqlite3"),
            "regions": {settings.region: {}},
        }
        log.info(
            "escalation on: the default region policy, to the core",
            region=settings.region,
            core=settings.core_address,
        )
    if settings.mqtt is None:
        host, _, port = settings.listen.rpartition(":")
        defaults = MqttSettings()
        binary = shutil.which(defaults.mosquitto_binary) or shutil.which(
            defaults.mosquitto_binary, path="/usr/sbin:/usr/local/sbin"
        )
        if binary is None or not defaults.dynsec_plugin.exists():
            missing = "mosquitto" if binary is None else str(defaults.dynsec_plugin)
            log.warning(
                f"MQTT off: {missing} not found; devices use gRPC only "
                "(install Debian's mosquitto package to turn it on)"
            )
        else:
            mqtt_port = int(port) + 1 if 0 < int(port) < 65535 else 0
            update["mqtt"] = {
                "host": host.strip("[]"),  # Mosquitto takes an IPv6 address bare
                "port": mqtt_port,
                "bridge_port": 0,
                "data_dir": str(state / "mqtt"),
            }
            log.info("MQTT on: devices' mutual-TLS listener", address=f"{host}:{mqtt_port}")
    return settings.model_copy(update=update) if update else settings


def _core_option(values: tuple[str, ...]) -> str | None:
    """``--core A --core B,C`` → ``A,B,C`` (the settings validate each address)."""
    return ",".join(values) if values else None


async def _serve(settings: Any) -> None:
    from gateway import GatewayService

    # The plug-ins the settings configure ([mqtt], [escalation]) start with the service.
    async with GatewayService(settings) as service:
        if service.console is not None:
            click.echo(f"gateway {service.gateway_id}: console {service.console.url}", err=True)
        await service.run_until_signalled()


@gateway.command("config-reference")
def config_reference() -> None:
    """Print every configuration key, its default and its environment override (Markdown)."""
    from gateway import describe_settings

    click.echo("| key | default | description |")
    click.echo("|---|---|---|")
    for row in describe_settings():
        click.echo(row)
