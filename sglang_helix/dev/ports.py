"""Ports for the servers, routers and bootstrap servers the dev harness launches on loopback."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()  # ports free_port returned: servers starting together bind later
PORT_FLOOR = 10000  # free_port picks in [PORT_FLOOR, the kernel's ephemeral range)


def _ephemeral_low() -> int:
    """First port of the range the kernel hands to bind(0) and outgoing connections (Linux)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now that no other process is likely to take before a server binds it.

    An SGLang server binds its port 10-40 s after its launch (its imports first). Ports from
    bind(0) lie in the kernel's ephemeral range, from which it also picks the source port of
    every outgoing connection (HTTP polls, gloo pairs); with the suite on two workers a server
    once found its bind(0) port taken (EADDRINUSE), most likely so. The port is drawn at random
    below that range instead (checked free by binding it), and is never one this process handed
    out before. Never a hard-coded number."""
    low, draw = _ephemeral_low(), random.SystemRandom()
    for _ in range(1000):
        port = draw.randrange(PORT_FLOOR, low) if low - PORT_FLOOR >= 1000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError(f"no free port on {host} below {low}")
