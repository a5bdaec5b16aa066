"""SGLang's router (sglang-router's Rust router, started through `router_main`: its own launcher
minus an import of all of SGLang) on loopback for tests and demos: in front of data-parallel replicas with its cache-aware policy, or in front of
a PD pair (dev/pd.py).

    with launch_cache_aware_router([server.base_url], dp_aware=True, log_dir=logs) as router:
        out = generate(router.url, text="...", max_new_tokens=8)

`dp_aware`: the router asks each worker's /server_info for its --dp-size and routes to each DP rank
(`url@rank`, the request's `routed_dp_rank`) as a worker of its own, so one `--dp-size D` server is
D workers of the policy. The cache-aware policy keeps an approximate prefix tree of the text it
routed to each worker (sglang-router 0.3.2, HTTP workers) and sends a request to the worker whose
tree shares the longest prefix with it (at least `--cache-threshold` of it), else to the least
loaded; with Helix each replica's radix cache keeps those prefixes at --page-size granularity (not
page x KVP), as the server reports in `cached_tokens`. The process tree is killed on exit.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port
from .server import ServerStartError, _die_with_parent, kill_tree, log_tail

ROUTER_START_TIMEOUT_S = 60.0


@dataclass
class Router:
    """A running router (valid inside its context manager)."""

    url: str
    process: subprocess.Popen
    log_path: Path


def router_argv(args: Sequence[str], port: int) -> list[str]:
    """The router command line: `args` (workers, policy) on loopback `port`."""
    return [sys.executable, "-m", "sglang_helix.dev.router_main", *args,
            "--host", "127.0.0.1", "--port", str(port),
            # its metrics exporter defaults to the fixed port 29000: two routers would collide
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]


def cache_aware_args(worker_urls: Sequence[str], *, dp_aware: bool = False,
                     cache_threshold: float | None = None) -> list[str]:
    """Router flags for the cache-aware policy over `worker_urls` (each DP rank a worker with
    dp_aware)."""
    args = ["--worker-urls", *worker_urls, "--policy", "cache_aware"]
    if dp_aware:
        args.append("--dp-aware")
    if cache_threshold is not None:
        args += ["--cache-threshold", str(cache_threshold)]
    return args


@contextlib.contextmanager
def run_router(args: Sequence[str], log_dir: Path,
               timeout: float = ROUTER_START_TIMEOUT_S) -> Iterator[Router]:
    """Start the router with `args`, wait until /readiness answers 200 (its workers healthy),
    yield it, always kill it."""
    port = free_port()
    log_path = Path(log_dir) / f"router-{port}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(router_argv(args, port), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=_die_with_parent)
    router = Router(f"http://127.0.0.1:{port}", popen, log_path)
    try:
        wait_ready(router, timeout)
        yield router
    finally:
        kill_tree(popen)


def launch_cache_aware_router(worker_urls: Sequence[str], *, log_dir: Path, dp_aware: bool = False,
                              cache_threshold: float | None = None,
                              timeout: float = ROUTER_START_TIMEOUT_S):
    """`run_router` with the cache-aware policy over `worker_urls` (context manager -> Router)."""
    return run_router(cache_aware_args(worker_urls, dp_aware=dp_aware,
                                       cache_threshold=cache_threshold), log_dir, timeout)


def wait_ready(router: Router, timeout: float) -> None:
    """Poll GET /readiness until 200 (503 until its workers are healthy); fail if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.process.poll() is not None:
            raise ServerStartError(f"router exited with {router.process.returncode}; log "
                                   f"{router.log_path}:\n{log_tail(router.log_path)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(router.url + "/readiness",
                                                                  timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise ServerStartError(f"router not ready after {timeout:.0f}s; log {router.log_path}:\n"
                           f"{log_tail(router.log_path)}")
