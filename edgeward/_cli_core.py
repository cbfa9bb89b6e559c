"""``edgeward core run``: the core service (enrolment, revocation feed, gateway directory).

``--config FILE`` (TOML, every key overridable by ``EDGEWARD_CORE_…``), or for a quick start on
one machine just ``--pki-dir DIR --listen HOST:PORT``: the core then issues its own server
certificate. Stops in order on SIGTERM or SIGINT. A port already in use (``listen``,
``enrol_listen``, ``metrics_listen``) stops the start-up with one line naming the setting.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import click

import pki
from edgeward._logging import configure_logging

__all__ = ["core"]


@click.group("core")
def core() -> None:
    """Run the core service."""


@core.command("run")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="TOML file")
@click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", help="HOST:PORT of the mutual-TLS port (Renew, Core API)")
@click.option("--enrol-listen", help="HOST:PORT of the enrolment port (default: listen + 1)")
@click.option("--metrics-listen", help="HOST:PORT of the Prometheus endpoint (/metrics)")
@click.option("--core-id", help="this core's id (default core-1)")
@click.option(
    "--registry",
    metavar="URL",
    help="registry: a path, sqlite:///PATH or postgresql://USER@HOST/DB "
    "(replicated cores share one; default: the SQLite file in PKI_DIR)",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--console-listen", help="HOST:PORT of the operator console (HTTPS)")
def run_cmd(
    *,
    config: Path | None,
    pki_dir: Path | None,
    listen: str | None,
    enrol_listen: str | None,
    metrics_listen: str | None,
    core_id: str | None,
    registry: str | None,
    log_level: str | None,
    console_listen: str | None,
) -> None:
    """Start the core and serve until SIGTERM or SIGINT."""
    # Imported here: the core needs the service side of the package (grpc health, pydantic
    # settings), a device install does not.
    from gateway import ConfigError, CoreServer, EscalateService, load_core_settings

    if config is None and pki_dir is None:
        raise click.UsageError("give --config FILE, or --pki-dir DIR (and --listen HOST:PORT)")

    # The entry point, not the library, configures the process: gRPC reads this once when it
    # starts. TLS 1.2 suites are ECDHE with AEAD only (no CBC: LUCKY13, RFC 7457 §2.8), as
    # gRPC's defaults already are; spelled out so a change of defaults cannot widen them.
    os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", pki.AEAD_CIPHERS_TLS12)
    try:
        settings = load_core_settings(
            config,
            pki_dir=pki_dir,
            listen=listen,
            enrol_listen=enrol_listen,
            metrics_listen=metrics_listen,
            core_id=core_id,
            registry=registry,
            log_level=log_level,
            console_listen=console_listen,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(level=settings.log_level)
    if config is None and settings.escalation is None:
        # Quick start: the core answers escalations with its models (loaded on first use),
        # keeping its answers beside the PKI; a configuration file decides for itself.
        from gateway import CoreEscalationSettings

        settings = settings.model_copy(
            update={
                "escalation": CoreEscalationSettings(
                    answer_store=settings.pki_dir / "core-answers.sqlite3"
                )
            }
        )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Replicas on one PostgreSQL registry share the escalation answers there too.
        answers_url = settings.registry if pki.is_postgres_url(settings.registry) else None
        escalate = (
            None
            if settings.escalation is None
            else EscalateService(settings.escalation, answers_url=answers_url)
        )
        async with CoreServer(settings, escalate=escalate) as server:
            metrics = ""
            if settings.metrics_listen is not None:
                mhost = settings.metrics_listen.rpartition(":")[0]
                metrics = f", metrics http://{mhost}:{server.metrics_port}/metrics"
            if server.console is not None:
                metrics += f", console {server.console.url}"
            click.echo(
                f"core {settings.core_id} serving trust domain {server.trust_domain}: "
                f"enrolment {server.enrol_address} (server TLS), "
                f"service {server.address} (mutual TLS), "
                f"registry {settings.registry_display}{metrics}",
                err=True,
            )
            await stop.wait()
            click.echo("shutting down", err=True)

    try:
        asyncio.run(serve())
    except (pki.PkiError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
