"""``edgeward enroll``: enrol this device with a one-time token, or ``--renew`` its certificate.

Running it again after a success is safe: it says the device is already enrolled and exits 0
(``--force`` enrols again, with a new token). Errors print as one line and exit non-zero; a
revoked or expired device exits with status 3 so scripts can stop retrying. A refused or failed
enrolment leaves the file system as it was: no new ``--out`` directory, an existing one
untouched.

The one-time token is a secret until it is spent. It is read from ``--token-file PATH``
(``-``: standard input) or the ``EDGEWARD_ENROLL_TOKEN`` environment variable; both stay out of
the process list. ``--token T`` still works but puts the token in every local user's ``ps``
output (``/proc/<pid>/cmdline`` is world-readable), so it prints a warning to stderr. The token
never appears in what this command prints.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from device_sdk import enroll as sdk_enroll
from device_sdk import renew as sdk_renew
from device_sdk.errors import CertificateExpired, DeviceRevoked, DeviceSdkError

__all__ = ["enroll"]

EXIT_FINAL = 3
TOKEN_ENV = "EDGEWARD_ENROLL_TOKEN"  # noqa: S105 - a variable name, not a secret
#: A token is ``<device-id>.<secret>``: well under this; a bigger file is not a token.
_MAX_TOKEN_FILE_BYTES = 4096
_ARGV_WARNING = (
    "warning: --token puts the enrolment token on the command line, where other local users "
    f"can read it (ps, /proc); use --token-file PATH, --token-file - (stdin) or {TOKEN_ENV}"
)


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
    "--token-file",
    help="file holding the one-time token from 'edgeward pki token' ('-': standard input)",
)
@click.option(
    "--token",
    help=f"the token itself: visible to other local users in the process list; prefer "
    f"--token-file or {TOKEN_ENV}",
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
    token_file: str | None,
    token: str | None,
    out: Path,
    renew: bool,
    force: bool,
    core_endpoint: str | None,
    timeout: float,
) -> None:
    """Enrol this device (or renew its certificate with --renew).

    The token comes from --token-file (or stdin with '-'), else EDGEWARD_ENROLL_TOKEN.
    """
    secret = ""
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
        secret = _read_token(token_file=token_file, token=token)
        if ca_bundle is None:
            raise click.UsageError("enrolling needs --ca-bundle")
        result = asyncio.run(
            sdk_enroll(
                endpoint=list(endpoint),
                ca_bundle_pem=ca_bundle.read_bytes(),
                token=secret,
                out_dir=out,
                force=force,
                core_address=core_endpoint,
                timeout_s=timeout,
            )
        )
    except (DeviceRevoked, CertificateExpired) as exc:
        raise _FinalError(_redact(str(exc), secret)) from None
    except (DeviceSdkError, OSError, ValueError) as exc:
        raise click.ClickException(_redact(str(exc).splitlines()[0], secret)) from None
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


def _redact(message: str, secret: str) -> str:
    """``message`` without the token, should any layer below ever quote it."""
    return message.replace(secret, "<token>") if secret else message


def _read_token(*, token_file: str | None, token: str | None) -> str:
    """The one token from exactly one source; its text never enters an error message."""
    env = os.environ.get(TOKEN_ENV)
    given = [name for name, v in (("--token-file", token_file), ("--token", token)) if v]
    if len(given) > 1:
        raise click.UsageError("give the token once: --token-file or --token, not both")
    if token is not None:
        click.echo(_ARGV_WARNING, err=True)
        value = token
    elif token_file is not None:
        value = _read_token_file(token_file)
    elif env:
        value = env
    else:
        raise click.UsageError(
            f"enrolling needs the token: --token-file PATH, --token-file - (stdin) or {TOKEN_ENV}"
        )
    value = value.strip()
    if not value or len(value.splitlines()) != 1:
        raise click.UsageError("the token must be one line: <device-id>.<secret>")
    return value


def _read_token_file(path: str) -> str:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(_MAX_TOKEN_FILE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(_MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise click.UsageError(f"cannot read --token-file {path}: {exc.strerror or exc}") from None
    source = "standard input" if path == "-" else path
    if len(data) > _MAX_TOKEN_FILE_BYTES:
        raise click.UsageError(f"{source} is too large to hold an enrolment token")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise click.UsageError(f"{source} does not hold an enrolment token (not ASCII)") from None
