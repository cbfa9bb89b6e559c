"""Process limits of a gateway holding a fleet: open files in the gateway and its Mosquitto.

Every device connection is a descriptor. A broker that runs out of them cannot ``accept``
anything, the gateway's own listener included (its bridge and the control client that cuts
revoked devices), nor open its persistence file at the next autosave. The managed broker's
device listener is therefore capped below the broker's open-files limit, and the gateway raises
its soft limit (inherited by the broker) to the hard one at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import ssl
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import pki
from gateway import MqttSettings
from gateway._mqtt._config import BROKER_RESERVED_FILES
from gateway._service import limit_malloc_arenas, raise_open_files_limit
from tests._support.mqtt import BrokerHarness
from tests.conftest import IssueFn, require_tool

ROOT = Path(__file__).resolve().parents[2]

#: The broker's soft open-files limit in the exhaustion test (at least).
LIMIT = 200


@contextlib.contextmanager
def soft_open_files(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect_packet() -> bytes:
    # MQTT 5 CONNECT, clean start, keep-alive 60, no properties, empty client id (the broker
    # takes the certificate CN).
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + struct.pack("!H", 0)
    return b"\x10" + bytes([len(body)]) + body


async def _mqtt_connect(port: int, ctx: ssl.SSLContext) -> asyncio.StreamWriter | None:
    """A device connection held open, or ``None`` when the broker refused or closed it."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10
        )
        writer.write(_connect_packet())
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
        return None
    return writer if connack[0] == 0x20 and connack[3] == 0 else None


def test_max_connections_follows_the_open_files_limit() -> None:
    default = MqttSettings()
    assert default.broker_max_connections(1024) == 1024 - BROKER_RESERVED_FILES
    assert default.broker_max_connections(65536) == 65536 - BROKER_RESERVED_FILES
    assert MqttSettings(max_connections=500).broker_max_connections(65536) == 500
    # An explicit value the descriptors cannot hold is capped too.
    assert MqttSettings(max_connections=5000).broker_max_connections(1024) == 1024 - 64
    with pytest.raises(ValueError, match="max_connections"):
        MqttSettings(max_connections=-2)


def test_gateway_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard limit too low to lower the soft one")
    with soft_open_files(256):
        before, after = raise_open_files_limit()
        now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert before == 256
    assert after == now_soft
    assert now_hard == hard
    if hard != resource.RLIM_INFINITY:
        assert now_soft == hard


async def test_a_fleet_beyond_the_descriptors_leaves_the_gateways_listener_working(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    """More devices than the broker has descriptors: the devices past the cap are refused,
    those admitted keep working, and the gateway's own listener still accepts (without the
    cap the broker's ``accept`` fails with EMFILE for every listener)."""
    require_tool("mosquitto")
    # The limit is lowered in this process while the broker starts (it inherits it): leave
    # room for what this process already has open.
    limit = max(LIMIT, len(os.listdir("/proc/self/fd")) + 64)
    gateway = issue("gateway", "gw-limits")
    devices = [issue("device", f"fd-{i:03d}") for i in range(limit + 40)]
    contexts = [pki.client_ssl_context(d) for d in devices]
    h = BrokerHarness(pki_dir=pki_dir, gateway=gateway, data_dir=tmp_path / "mqtt")
    with soft_open_files(limit):
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(h.run())  # the broker inherits the limit
    async with stack:
        held: list[asyncio.StreamWriter] = []
        for ctx in contexts:
            w = await _mqtt_connect(h.port, ctx)
            if w is not None:
                held.append(w)
        # Mosquitto 2.0 admits max_connections + 1 (it counts the new client afterwards).
        assert 0 < len(held) <= limit - BROKER_RESERVED_FILES + 1
        # The gateway's listener accepts a new connection: the TLS handshake completes.
        gw_ctx = pki.client_ssl_context(gateway)
        _r, w = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", h.broker.bridge_port, ssl=gw_ctx, server_hostname="localhost"
            ),
            15,
        )
        w.close()
        # A device refused while the broker was full gets in once another leaves.
        held.pop().close()
        for ctx in contexts[-5:]:
            w2 = None
            for _ in range(50):
                w2 = await _mqtt_connect(h.port, ctx)
                if w2 is not None:
                    break
                await asyncio.sleep(0.1)
            assert w2 is not None
            held.append(w2)
            break
        for w in held:
            w.close()


_ARENAS = textwrap.dedent(
    """
    import ctypes, sys, threading
    from gateway._service import limit_malloc_arenas
    if sys.argv[1] == "cap":
        assert limit_malloc_arenas(2)
    start = threading.Barrier(12)
    kept = []
    def work():
        start.wait()
        kept.append([bytearray(20_000) for _ in range(50)])
    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena n:" block per arena, on stderr
    """
)


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _ARENAS, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_the_gateway_caps_malloc_arenas_so_threads_share_their_heaps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC's threads each get a heap of their own by default (up to eight per core), which
    keeps their freed memory apart: the gateway caps them at two."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert _arenas("cap") <= 2
    assert _arenas("default") > 2  # what the cap prevents
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas(2)  # the operator's setting wins
