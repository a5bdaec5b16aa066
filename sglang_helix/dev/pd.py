"""Run a real prefill/decode-disaggregated SGLang deployment on one machine (tests, demos).

    with launch_pd(model, decode_args=["--enable-helix", "--helix-kvp-size", "2"], decode_tp=2) as pd:
        out = generate(pd.router_url, [1, 2, 3], max_new_tokens=8)

starts, as separate process trees on free loopback ports: a prefill server (Helix off), a decode
server, and SGLang's PD router (sglang-router `--pd-disaggregation`, dev/router.py).
KV moves over SGLang's mooncake backend with the TCP transport (`mooncake_tcp`; the PyPI package
mooncake-transfer-engine-non-cuda, which needs Debian's libibverbs1 even for TCP). Everything is
killed (whole trees, checked) on exit, also when start-up fails.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .router import ROUTER_START_TIMEOUT_S, run_router
from .ports import free_port
from .server import (DEFAULT_START_TIMEOUT_S, Server, kill_tree, request_json, start_server,
                     wait_healthy)

TRANSFER_BACKEND = "mooncake_tcp"
# SGLang's KV managers and mooncake advertise the address SGLang detects for the host (a NIC's),
# so everything is pinned to loopback: tests never send traffic to another address.
LOOPBACK_ENV = {"SGLANG_HOST_IP": "127.0.0.1", "HOST_IP": "127.0.0.1"}
# Bounded failure detection for tests: SGLang's defaults wait minutes for a dead peer.
FAST_FAILURE_ENV = {
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "2",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60",
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "60",
    # a decode frees the pages of a failed transfer once the prefill acks that it stopped writing
    # them, or after this many seconds (30 by default): a dead prefill never acks
    "SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE_TIMEOUT": "5",
}


@dataclass
class PDDeployment:
    """A running prefill + decode + router trio (valid inside `launch_pd`)."""

    prefill: Server
    decode: Server
    router_url: str
    router: subprocess.Popen
    router_log: Path
    bootstrap_port: int


def pd_args(mode: str, bootstrap_port: int | None = None) -> list[str]:
    """SGLang flags of one side of the deployment."""
    args = ["--disaggregation-mode", mode, "--disaggregation-transfer-backend", TRANSFER_BACKEND]
    if bootstrap_port is not None:
        args += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
    return args


def router_args(prefill: Server, bootstrap_port: int, decode: Server) -> list[str]:
    """The PD router's flags (dev/router.py adds loopback host, port and metrics port)."""
    return ["--pd-disaggregation", "--prefill", prefill.base_url, str(bootstrap_port),
            "--decode", decode.base_url,
            # One decode server: a retry would re-send to the same (maybe dead) peer and keep the
            # client waiting for the bootstrap timeout; fail the request at once instead.
            "--disable-retries"]


@contextlib.contextmanager
def launch_router(prefill: Server, bootstrap_port: int, decode: Server,
                  log_dir: Path, timeout: float = ROUTER_START_TIMEOUT_S) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    with run_router(router_args(prefill, bootstrap_port, decode), log_dir, timeout) as router:
        yield router.url, router.process, router.log_path


@contextlib.contextmanager
def launch_pd(
    model_path: str,
    *,
    decode_args: Sequence[str] = (),
    decode_tp: int = 1,
    prefill_args: Sequence[str] = (),
    prefill_tp: int = 1,
    common_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> Iterator[PDDeployment]:
    """Prefill server, decode server and PD router; yields the running deployment.

    `common_args` go to both servers (page size, pool size, ...); `env` (e.g. FAST_FAILURE_ENV)
    to both servers. Raises ServerStartError with the failing log's tail.
    """
    logs = Path(log_dir or tempfile.mkdtemp(prefix="sglang_helix_pd_"))
    env = {**LOOPBACK_ENV, **(env or {})}
    bootstrap = free_port()
    with contextlib.ExitStack() as stack:
        # both start at once (the decode needs the prefill only when a request comes), so their
        # start-ups overlap
        prefill = start_server(model_path, [*common_args, *pd_args("prefill", bootstrap), *prefill_args],
                               tp=prefill_tp, env=env, log_dir=logs)
        stack.callback(kill_tree, prefill.process)
        decode = start_server(model_path, [*common_args, *pd_args("decode"), *decode_args],
                              tp=decode_tp, env=env, log_dir=logs)
        stack.callback(kill_tree, decode.process)
        for server in (prefill, decode):
            wait_healthy(server, timeout)
        url, router, router_log = stack.enter_context(launch_router(prefill, bootstrap, decode, logs))
        yield PDDeployment(prefill, decode, url, router, router_log, bootstrap)


def server_state(server_url: str, key: str) -> Any:
    """internal_states[0][key] of a server's /server_info (None if absent)."""
    info = request_json(server_url + "/server_info")
    states = info.get("internal_states") or [{}]
    return states[0].get(key)
