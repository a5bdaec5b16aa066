"""The e2e harness's own launchers (sglang_helix.dev), without starting a server."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

ROUTER_PROBE = """
import sys
from sglang_helix.dev import router_main
try:
    router_main.main(sys.argv[1:])
except SystemExit as exc:
    print("exit", exc.code)
print("sglang imported:", any(m == "sglang" or m.startswith("sglang.") for m in sys.modules))
"""


@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                    reason="sglang-router not installed (scripts/install-cpu.sh)")
def test_router_main_parses_sglang_routers_flags_without_importing_sglang():
    """router_main runs sglang-router's own parser (its --help lists the router's flags) and
    never imports SGLang (its import costs ~7.5 s of CPU per router start, dev/router_main.py)."""
    run = subprocess.run([sys.executable, "-c", ROUTER_PROBE, "--help"], capture_output=True,
                         text=True, timeout=120, check=True)
    assert "--pd-disaggregation" in run.stdout and "--policy" in run.stdout
    assert run.stdout.rstrip().endswith("exit 0\nsglang imported: False"), run.stdout[-500:]


def test_router_main_refuses_the_mini_load_balancer():
    from sglang_helix.dev import router_main

    with pytest.raises(SystemExit, match="--mini-lb: run `python -m sglang_router.launch_router`"):
        router_main.main(["--mini-lb", "--worker-urls", "http://127.0.0.1:1"])


def test_free_port_is_below_the_ephemeral_range_and_never_repeats():
    """Ports the kernel may hand to bind(0) or an outgoing connection meanwhile are avoided."""
    import socket

    from sglang_helix.dev.ports import PORT_FLOOR, _ephemeral_low, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_FLOOR <= port < _ephemeral_low() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free when handed out
