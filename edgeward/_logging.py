"""Logging set-up for the services' entry points (libraries never configure logging).

JSON lines when stderr is not a terminal, a readable console otherwise. Context bound with
:func:`structlog.contextvars.bind_contextvars` (device id, method) lands in every line of that
unit of work.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]

# Keys whose values must never reach a log line, whatever a caller passes.
_SECRET_KEYS = frozenset({"token", "key", "private_key", "password", "csr", "certificate_pem"})


def _redact(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    for k in _SECRET_KEYS.intersection(event_dict):
        event_dict[k] = "[redacted]"
    return event_dict


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once for a service or command.

    ``json=None`` picks JSON when stderr is not a terminal.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # Resolve sys.stderr at each use, not now: a command run inside a test runner (click's
        # CliRunner) swaps stderr and closes it afterwards.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
