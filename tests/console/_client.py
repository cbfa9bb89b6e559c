"""An HTTP client for console tests: real TLS (the trust domain's CA bundle), a cookie jar
that accepts cookies from 127.0.0.1, and helpers to log in and read CSRF tokens."""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

import pki

__all__ = ["ConsoleClient", "console_client"]

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class ConsoleClient:
    def __init__(self, session: aiohttp.ClientSession, base: str, ctx: ssl.SSLContext) -> None:
        self.http = session
        self.base = base
        self.ssl = ctx

    async def request(
        self, method: str, path: str, *, origin: str | None = "", **kwargs: Any
    ) -> tuple[int, dict[str, str], str]:
        headers = dict(kwargs.pop("headers", {}))
        if origin == "":
            origin = self.base
        if origin is not None and method != "GET":
            headers.setdefault("Origin", origin)
        async with self.http.request(
            method,
            path if path.startswith("https://") else self.base + path,
            ssl=self.ssl,
            allow_redirects=False,
            headers=headers,
            **kwargs,
        ) as r:
            return r.status, dict(r.headers), await r.text(errors="replace")

    async def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return await self.request("POST", path, **kwargs)

    async def login(self, token: str) -> tuple[int, dict[str, str]]:
        status, headers, _ = await self.post("/login", data={"token": token})
        return status, headers

    async def csrf(self, path: str = "/fleet") -> str:
        status, _, body = await self.get(path)
        assert status == 200, (status, body[:200])
        m = _CSRF.search(body)
        assert m is not None
        return m.group(1)


def client_context(ca_bundle: Path, identity: pki.IdentityFiles | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_bundle))
    if identity is not None:
        ctx.load_cert_chain(str(identity.chain), str(identity.key))
    return ctx


@asynccontextmanager
async def console_client(
    base: str, ca_bundle: Path, identity: pki.IdentityFiles | None = None
) -> AsyncIterator[ConsoleClient]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        yield ConsoleClient(session, base, client_context(ca_bundle, identity))
