"""Choosing a free TCP port for a listener that must know its port before it starts.

Mosquitto, and a core whose enrolment port is announced before it binds, cannot report a port
they picked themselves, so the port is chosen first and bound later. A port the kernel hands
out for ``bind(0)`` comes from the ephemeral range, the range every outgoing connection also
draws its local port from; under load one of those connections can take the port before the
server binds it ("Address already in use"). Ports are therefore drawn below that range, and a
port handed out once is not handed out again by this process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port"]

_LOCK = threading.Lock()
_HANDED_OUT: set[int] = set()
_LOWEST = 20000


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now and below the ephemeral range."""
    high = _ephemeral_low() - 1
    with _LOCK:
        if high - _LOWEST > 1000:
            for _ in range(500):
                port = random.randint(_LOWEST, high)  # noqa: S311 - not a secret
                if port in _HANDED_OUT:
                    continue
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    try:
                        sock.bind((host, port))
                    except OSError:
                        continue
                _HANDED_OUT.add(port)
                return port
        # A machine whose ephemeral range leaves no room below it: let the kernel choose.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
