"""The ``edgeward`` command.

Each sub-command group lives in its own module and is imported only when used, so a device
that installs the base distribution (no onnxruntime) can run ``edgeward enroll``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from edgeward import __version__

__all__ = ["main"]

# gRPC's C core logs handshake details straight to stderr, outside structlog; keep only its
# errors (an operator can still raise it with GRPC_VERBOSITY=debug).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# command name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, tuple[str, str]] = {
    "pki": ("edgeward._cli_pki:pki", "certificate authority, tokens, revocation, CRL"),
    "enroll": ("edgeward._cli_enroll:enroll", "enrol this device (or renew with --renew)"),
    "device": ("edgeward._cli_device:device", "simulated devices"),
    "core": ("edgeward._cli_core:core", "run the core service"),
    "gateway": ("edgeward._cli_gateway:gateway", "run an edge gateway"),
    "demo": ("edgeward._demo:demo", "PKI, core, two gateways, devices, live output"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or "a module"
            raise click.ClickException(
                f"'edgeward {cmd_name}' needs {missing}, which is not installed "
                "(gateway and core hosts install the 'gateway' extra: "
                "pip install 'edgeward[gateway]')"
            ) from exc
        command: Any = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target[0]} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in sorted(_COMMANDS.items())])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
# The version of this code, not of whatever distribution metadata happens to be installed.
@click.version_option(version=__version__, prog_name="edgeward")
def main() -> None:
    """edgeward: zero-trust edge gateway for camera-carrying IoT devices."""
