"""Fixtures for console tests: a real core with its console on a free port, operators."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import pki
from tests._support.core import RunningCore, running_core


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
async def core(pki_dir: Path, tmp_path: Path) -> AsyncIterator[RunningCore]:
    async with running_core(
        pki_dir, tmp_path, console_enabled=True, console_listen="127.0.0.1:0"
    ) as running:
        yield running


def operator_token(core: RunningCore, name: str, role: str, **kwargs: object) -> str:
    return pki.create_operator_token(
        core.registry,
        name=name,
        role=role,
        now=kwargs.pop("now", now()),
        **kwargs,  # type: ignore[arg-type]
    )
