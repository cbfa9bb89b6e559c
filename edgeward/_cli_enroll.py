"""``edgeward enroll``: enrol this device with a one-time token, or ``--renew`` its certificate.

Running it again after a success is safe: it says the device is already enrolled and exits 0
(``--force`` enrols again, with a new token). Errors print as one line and exit non-zero; a
revoked or expired device exits with status 3 so scripts can stop retrying.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from device_sdk._enrollment import enroll as sdk_enroll
from device_sdk._enrollment import renew as sdk_renew
from device_sdk.errors import CertificateExpired, DeviceRevoked, DeviceSdkError

__all__ = ["enroll"]

EXIT_FINAL = 3


class _FinalError(click.ClickException):
    exit_code = EXIT_FINAL


@click.command("enroll")
@click.option(
    "--endpoint",
    required=True,
    multiple=True,
    help="core HOST:PORT: the enrolment port, or with --renew the mutual-TLS port; repeat it "
    "(or give a comma list) for replicas, tried in order when one is down",
)
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA bundle of the trust domain (needed to enrol)",
)
@click.option(
    "--token",
    envvar="EDGEWARD_ENROLL_TOKEN",
    help="one-time token from 'edgeward pki token' (or EDGEWARD_ENROLL_TOKEN)",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="identity directory",
)
@click.option("--renew", is_flag=True, help="renew the identity in --out (new key)")
@click.option("--force", is_flag=True, help="enrol again even if --out holds an identity")
@click.option(
    "--core-endpoint",
    help="the core's mutual-TLS HOST:PORT (or a comma list of replicas), kept for renewal",
)
@click.option("--timeout", default=15.0, show_default=True, help="seconds to wait for the core")
def enroll(
    *,
    endpoint: tuple[str, ...],
    ca_bundle: Path | None,
    token: str | None,
    out: Path,
    renew: bool,
    force: bool,
    core_endpoint: str | None,
    timeout: float,
) -> None:
    """Enrol this device (or renew its certificate with --renew)."""
    try:
        if renew:
            result = asyncio.run(
                sdk_renew(identity_dir=out, endpoint=list(endpoint), timeout_s=timeout)
            )
            click.echo(
                f"renewed {result.device_id}: serial {result.serial}, valid until "
                f"{result.not_after:%Y-%m-%d %H:%M} UTC"
            )
            return
        if ca_bundle is None or not token:
            raise click.UsageError("enrolling needs --ca-bundle and --token")
        result = asyncio.run(
            sdk_enroll(
                endpoint=list(endpoint),
                ca_bundle_pem=ca_bundle.read_bytes(),
                token=token,
                out_dir=out,
                force=force,
                core_address=core_endpoint,
                timeout_s=timeout,
            )
        )
    except (DeviceRevoked, CertificateExpired) as exc:
        raise _FinalError(str(exc)) from None
    except (DeviceSdkError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    if result.already_enrolled:
        click.echo(
            f"already enrolled as {result.device_id} in {out} (valid until "
            f"{result.not_after:%Y-%m-%d %H:%M} UTC); use --force to enrol again"
        )
        return
    click.echo(
        f"enrolled {result.device_id} ({result.device_type}, region {result.region}): "
        f"serial {result.serial}, valid until {result.not_after:%Y-%m-%d %H:%M} UTC; "
        f"identity in {out}"
    )
