"""Run real SGLang (0.5.23, CPU engine) in tests and demos: an HTTP server or an offline Engine.

Everything SGLang runs in a child process of its own session (process group), so:

- the pytest process never imports SGLang's global state (hooks, env caches);
- teardown kills the whole tree (launcher, tokenizer, scheduler ranks, detokenizer), first with
  SIGTERM, then SIGKILL, and checks that nothing is left (`ProcessesLeftError` otherwise);
- every wait has a deadline; a server that dies or does not come up raises `ServerStartError`
  with the tail of its log.

CPU settings applied for the child (docs/sglang-integration.md): `sglang_helix.srt.cpu.env`
(SGLANG_USE_CPU_ENGINE=1, one core per rank, NCCL disabled), `--device cpu`,
`--attention-backend torch_native` (the CPU default resolves to intel_amx, which needs the real
CPU sgl-kernel), small pools (`--max-total-tokens 4096 --mem-fraction-static 0.05`; larger pools
meet the OOM killer at tp 2), fp32 (`--dtype float32`), `--grammar-backend none` (no xgrammar
compile at start), `--sampling-backend pytorch`, `--sleep-on-idle`. Any of these can be overridden by passing the
same flag in `extra_args` (the last occurrence wins in argparse). SGLANG_HELIX / SGLANG_PLUGINS
from the caller's environment are not passed on unless given in `env`.

API:
    with launch_server(model_path, ["--page-size", "4"], tp=2) as server:   # start, wait, kill
        out = generate(server.base_url, input_ids=[[1, 2, 3]], max_new_tokens=8)
    server = start_server(model_path, tp=2)   # returns at once: start several, then wait_healthy
    engine.run_engine(model_path, [[1, 2, 3]], max_new_tokens=8, tp=1)   # dev/engine.py: sglang.Engine
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..srt.cpu.env import apply_cpu_env
from .ports import free_port
from ..errors import HelixError

DEFAULT_START_TIMEOUT_S = 300.0
DEFAULT_REQUEST_TIMEOUT_S = 180.0
# SIGTERM -> SIGKILL. SGLang's ranks and detokenizer exit at once on SIGTERM; its launcher and
# multiprocessing's resource tracker then spend ~6 s in their handlers (measured on the 2-core
# VM), which nothing here needs: a suite of ~30 launches would wait minutes for them.
KILL_GRACE_S = 1.5
LOG_TAIL_CHARS = 6000
# Flags first, so a caller's extra_args (later on the command line) override them.
CPU_DEFAULT_ARGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--dtype", "float32",
    "--max-total-tokens", "4096",
    "--mem-fraction-static", "0.05",
    "--grammar-backend", "none",
    "--sampling-backend", "pytorch",
    # Without it an idle scheduler busy-polls (~75% of a core per rank, measured), starving
    # everything else on a small CPU box while a server waits between tests.
    "--sleep-on-idle",
)
# Variables that would switch Helix (or foreign plugins) on in the child without the caller asking.
SCRUBBED_ENV = ("SGLANG_HELIX", "SGLANG_PLUGINS")

class ServerStartError(HelixError):
    """The SGLang server exited or did not answer /health before its deadline (log tail inside)."""


class ProcessesLeftError(HelixError):
    """Processes of a launched SGLang tree survived SIGKILL."""


class RequestError(HelixError):
    """An HTTP request to the server failed (status and body inside)."""


# ---------------------------------------------------------------- environment / ports


def child_env(tp: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang child with `tp` CPU ranks.

    Starts from os.environ minus SCRUBBED_ENV, applies `env` (caller wins), then fills the CPU
    multi-rank variables the caller did not set (`sglang_helix.srt.cpu.env`). SGLang's broken CPU MLA
    prefill is fixed by the plugin itself (CPU fix "absorbed-mla", sglang_helix.srt.cpu.mla_fix;
    opt out with SGLANG_HELIX_CPU_MLA_FIX=0 in `env`).
    """
    out = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    out.update(env or {})
    out["PYTHONUNBUFFERED"] = "1"
    apply_cpu_env(tp, out)
    return out


# ---------------------------------------------------------------- process tree


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: Sequence[Any]) -> list[Any]:
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def rank_pids(pid: int) -> list[int]:
    """Pids of the SGLang scheduler (rank) processes under `pid` (titled sglang::scheduler_*)."""
    import psutil

    out = []
    for proc in _descendants(pid):
        try:
            title = " ".join(proc.cmdline()) or proc.name()
        except psutil.NoSuchProcess:
            continue
        if title.startswith("sglang::scheduler"):
            out.append(proc.pid)
    return sorted(out)


def vm_hwm_bytes(status_text: str) -> int:
    """Peak resident set size from a /proc/<pid>/status text (its VmHWM line, in kB)."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM line in the status text (not Linux /proc/<pid>/status?)")


def peak_rss_bytes(pids: Sequence[int]) -> list[int]:
    """Peak RSS of each pid since it started or since reset_peak_rss (Linux /proc)."""
    return [vm_hwm_bytes(Path(f"/proc/{pid}/status").read_text()) for pid in pids]


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Restart each pid's peak RSS from its current RSS ("5" > /proc/<pid>/clear_refs; Linux)."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def kill_tree(popen: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group (and any descendant that left it), then SIGKILL; verify.

    Descendants are listed before the first signal: SGLang's ranks are reparented once the
    launcher dies, so they cannot be found through it afterwards.
    """
    import psutil

    tree = [psutil.Process(popen.pid)] if popen.poll() is None else []
    tree += _descendants(popen.pid)
    _signal_all(popen.pid, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(popen.pid, _alive(tree), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=grace_s)
    psutil.wait_procs(tree, timeout=grace_s)
    left = _alive(tree)
    if left:
        raise ProcessesLeftError(f"SGLang processes survived SIGKILL: {[p.pid for p in left]}")


def _signal_all(pgid: int, procs: Sequence[Any], sig: signal.Signals) -> None:
    # The child was started with start_new_session=True, so its pid is its process group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for proc in procs:  # stragglers that changed group
        with contextlib.suppress(Exception):
            proc.send_signal(sig)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the launcher if the Python process that started it dies.

    Covers a test runner killed without teardown (e.g. by `timeout`); SGLang's own ranks already
    die with the launcher (`kill_itself_when_parent_died`). Linux only; a no-op elsewhere.
    """
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Last `chars` characters of a log file ('' if missing)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode("utf-8", "replace")


# ---------------------------------------------------------------- server


@dataclass
class Server:
    """A running SGLang HTTP server (valid inside `launch_server`)."""

    base_url: str
    port: int
    tp: int
    log_path: Path
    process: subprocess.Popen
    start_s: float = 0.0  # seconds from the launch to the first healthy answer
    argv: list[str] = field(default_factory=list)
    started_at: float = 0.0  # time.monotonic() at the launch

    def log(self, chars: int = LOG_TAIL_CHARS) -> str:
        return log_tail(self.log_path, chars)


def server_argv(model_path: str | os.PathLike[str], port: int, tp: int,
                extra_args: Sequence[str] = ()) -> list[str]:
    """`python -m sglang.launch_server ...` for CPU (defaults first, caller's flags override)."""
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(port),
        "--tp-size", str(tp), *CPU_DEFAULT_ARGS, *map(str, extra_args),
    ]


def start_server(
    model_path: str | os.PathLike[str],
    extra_args: Sequence[str] = (),
    *,
    tp: int = 1,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> Server:
    """Start an SGLang server on a free port and return at once (not yet healthy).

    The caller owns the process tree: `wait_healthy` it, and `kill_tree(server.process)` it
    always. Starting several before waiting overlaps their start-up (a server's start is mostly
    interpreter imports, one process at a time in its launcher). The log goes to `log_dir`
    (default: a temp dir) as sglang-<port>.log.
    """
    port = free_port()
    log_path = Path(log_dir or tempfile.mkdtemp(prefix="sglang_helix_server_")) / f"sglang-{port}.log"
    argv = server_argv(model_path, port, tp, extra_args)
    started_at = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(tp, env), start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Server(f"http://127.0.0.1:{port}", port, tp, log_path, popen, argv=argv,
                  started_at=started_at)


@contextlib.contextmanager
def launch_server(
    model_path: str | os.PathLike[str],
    extra_args: Sequence[str] = (),
    *,
    tp: int = 1,
    timeout: float = DEFAULT_START_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> Iterator[Server]:
    """Start an SGLang server on a free port, wait for /health, yield it, always kill the tree.

    Raises ServerStartError (with the log tail) if the server exits or is not healthy within
    `timeout` seconds. The log goes to `log_dir` (default: a temp dir) as sglang-<port>.log.
    """
    server = start_server(model_path, extra_args, tp=tp, env=env, log_dir=log_dir)
    try:
        wait_healthy(server, timeout)
        yield server
    finally:
        kill_tree(server.process)


def wait_healthy(server: Server, timeout: float) -> None:
    """Poll GET /health (200 once warm-up is done) until `timeout`; fail fast if the child exits."""
    deadline = time.monotonic() + timeout
    seen: dict[int, Any] = {}
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise ServerStartError(
                f"SGLang server exited with code {code} before becoming healthy; "
                f"log {server.log_path}:\n{server.log()}"
            )
        dead = _dead_children(server.process.pid, seen)
        if dead:
            # A crashed scheduler rank does not always take the launcher down (seen on CPU: the
            # launcher kept waiting with a zombie scheduler), so waiting for exit could hang.
            raise ServerStartError(
                f"SGLang child process(es) {dead} died before the server became healthy; "
                f"log {server.log_path}:\n{server.log()}"
            )
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    server.start_s = time.monotonic() - server.started_at
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet, or 503 while warming up
        time.sleep(0.25)
    raise ServerStartError(
        f"SGLang server not healthy after {timeout:.0f}s; log {server.log_path}:\n{server.log()}"
    )


def _dead_children(pid: int, seen: dict[int, Any]) -> list[str]:
    """SGLang worker processes ("sglang::scheduler...", named by setproctitle) under `pid` seen
    alive earlier that are now gone or zombies. Other (possibly short-lived) helpers are ignored.

    Only direct children of the launcher (the scheduler ranks and the detokenizer) count: a
    helper a scheduler forks (e.g. torch inductor's compile workers) carries the scheduler's
    "sglang::" name until it execs, and its normal exit must not read as a crash.
    """
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=False)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        if child.pid not in seen:
            with contextlib.suppress(psutil.Error):
                if child.name().startswith("sglang::"):
                    seen[child.pid] = child
    dead = []
    for child_pid, child in seen.items():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                dead.append(f"{child_pid} (zombie)")
        except psutil.NoSuchProcess:
            dead.append(f"{child_pid} (gone)")
    return dead


# ---------------------------------------------------------------- requests


def request_json(url: str, payload: Mapping[str, Any] | None = None, *,
                 timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> Any:
    """POST `payload` as JSON (GET if None) and decode the JSON answer; RequestError on failure."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")[:2000]
        raise RequestError(f"{url}: HTTP {exc.code}: {body}") from exc


def generate(
    base_url: str,
    input_ids: Sequence[int] | None = None,
    *,
    text: str | None = None,
    max_new_tokens: int = 16,
    greedy: bool = True,
    return_logprob: bool = False,
    ignore_eos: bool = True,
    timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> dict[str, Any]:
    """One /generate request (token ids or text); returns SGLang's JSON answer.

    Keys used by tests: "output_ids" (generated ids), "text", "meta_info" (with
    "output_token_logprobs": [[logprob, token_id, None], ...] when return_logprob).
    `ignore_eos` defaults to True so lengths match a reference that ignores EOS too.
    """
    if (input_ids is None) == (text is None):
        raise ValueError("give exactly one of input_ids or text")
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
    if greedy:
        params["temperature"] = 0.0
    payload: dict[str, Any] = {"sampling_params": params, "return_logprob": return_logprob}
    if input_ids is not None:
        payload["input_ids"] = [int(t) for t in input_ids]
    else:
        payload["text"] = text
    return request_json(base_url + "/generate", payload, timeout=timeout)


def generate_concurrent(
    base_url: str, prompts: Sequence[Sequence[int]], **kwargs: Any
) -> list[dict[str, Any]]:
    """One /generate per prompt, all in flight at once (threads), answers in prompt order.

    Concurrent HTTP requests let the scheduler batch them: prefill together, decode as a batch.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
        futures = [pool.submit(generate, base_url, list(p), **kwargs) for p in prompts]
        return [f.result() for f in futures]


def output_ids(answer: Mapping[str, Any]) -> list[int]:
    """Generated token ids of a /generate answer (from output_ids, else from the logprobs)."""
    if "output_ids" in answer:
        return [int(t) for t in answer["output_ids"]]
    logprobs = answer.get("meta_info", {}).get("output_token_logprobs")
    if logprobs is None:
        raise KeyError(f"no output_ids in /generate answer: keys {sorted(answer)}")
    return [int(entry[1]) for entry in logprobs]
