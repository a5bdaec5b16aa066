"""Run a function on N local CPU ranks over gloo (tests, benchmarks and the perf probe).

`run_ranks` spawns `world_size` processes joined into one gloo process group (file:// rendezvous in
a fresh temp dir, so no port is ever hard-coded), runs `fn(rank, world_size, *args)` on each, and
returns the list of return values in rank order. A failure anywhere raises `RankFailure` naming
the rank(s) and carrying their tracebacks; stragglers past the timeout are killed.

Results travel back through files (torch.save), not a multiprocessing.Queue: a child blocked on a
full queue pipe never exits, which would turn a large return value into a bogus timeout.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

from .errors import HelixError


class RankFailure(HelixError):
    """One or more spawned ranks failed, timed out or exited without a result."""


def run_ranks(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    timeout: float = 180.0,
    *,
    threads: int = 1,
    backend: str = "gloo",
) -> list:
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks; return values in rank order.

    fn must be picklable (a module-level function); a script calling this needs the usual
    `if __name__ == "__main__":` guard (spawn re-imports the main module). Each rank
    initialises the default process group (`backend`, default gloo on loopback) and destroys
    it afterwards.
    Raises RankFailure naming every failed rank with its traceback (or its exit code / timeout).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="helix_ranks_")
    try:
        init_method = "file://" + os.path.join(workdir, "rendezvous")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, args, init_method, workdir, timeout, threads, backend),
                name=f"helix-rank-{rank}",
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        timed_out = _join_all(procs, timeout)
        return _collect(procs, workdir, timed_out, timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rank_main(fn, rank, world_size, args, init_method, workdir, timeout, threads, backend):
    """Child entry point: init the group, run fn, save ('ok', value) or ('error', traceback)."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Ranks share 2 busy cores with other jobs: intra-op threads would only oversubscribe.
    torch.set_num_threads(threads)
    result = ("error", "never ran")
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        result = ("error", traceback.format_exc())
    path = os.path.join(workdir, f"result_{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: the parent never reads a half-written file
    _exit_now(1 if result[0] == "error" else 0)


def _exit_now(code: int) -> None:
    """Leave without interpreter finalization, as fork-started children always do.

    The result is already on disk and the process groups are destroyed. A spawn child otherwise
    runs full finalization, where C++ teardown of libraries the rank imported (gloo worker threads
    still referencing tensors, see pytorch/pytorch#179291) can SIGABRT ("terminate called without
    an active exception") at random, long after fn finished: CI saw one such exit code -6.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _join_all(procs, timeout: float) -> set[int]:
    """Join every process by a shared deadline; kill (and report) the ones still alive."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    timed_out = set()
    for rank, p in enumerate(procs):
        if p.is_alive():
            timed_out.add(rank)
            p.kill()
            p.join(10)
    return timed_out


def _collect(procs, workdir: str, timed_out: set[int], timeout: float) -> list:
    values, failures = [], []
    for rank, p in enumerate(procs):
        path = os.path.join(workdir, f"result_{rank}.pt")
        status, payload = "error", None
        if os.path.exists(path):
            status, payload = torch.load(path, weights_only=False)
        if rank in timed_out:
            failures.append(f"rank {rank}: timed out after {timeout:.0f}s and was killed")
        elif status == "error":
            failures.append(f"rank {rank} (exit code {p.exitcode}):\n{payload or 'no result file'}")
        elif p.exitcode != 0:
            failures.append(f"rank {rank}: returned a result but exited with code {p.exitcode}")
        values.append(payload)
    if failures:
        raise RankFailure(f"{len(failures)} of {len(procs)} ranks failed:\n" + "\n".join(failures))
    return values
