"""Multi-rank CPU harness and paged-cache builders shared by tests and benchmarks.

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
from collections.abc import Callable, Sequence

import torch

from .layout import local_num_pages


class RankFailure(RuntimeError):
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
    if result[0] == "error":
        raise SystemExit(1)


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


def build_local_paged_cache(
    seqs: Sequence[torch.Tensor],
    page_size: int,
    kvp: int,
    kvp_rank: int,
    *,
    seed: int = 0,
    spare_pages: int = 2,
    fill: float = 1000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One KVP rank's paged cache for a batch, with its pages at shuffled physical slots.

    seqs: per request b, the full sequence's per-token KV [L_b, *feat] (for GQA, K and V
        concatenated on the last dim; for MLA, [L_b, R + Dr]).
    Returns cache [num_phys_pages, P, *feat] (seqs' dtype) and the rank's local page table
        [B, max_local_pages] int32: entry [b, i] is the physical page of local page i of request b
        (local page i = logical page i*KVP + kvp_rank). Unused slots (spare pages, the tail of a
        partial page, padding columns -> page 0) hold `fill`, so reading them shows up in results.
    """
    if not seqs:
        raise ValueError("seqs must hold at least one request")
    feat, dtype = seqs[0].shape[1:], seqs[0].dtype
    local_pages = [int(local_num_pages(s.shape[0], kvp_rank, page_size, kvp)) for s in seqs]
    total = sum(local_pages) + spare_pages
    gen = torch.Generator().manual_seed(seed * 1009 + kvp_rank)
    perm = torch.randperm(total, generator=gen)
    cache = torch.full((total, page_size, *feat), fill, dtype=dtype)
    table = torch.zeros(len(seqs), max(1, max(local_pages)), dtype=torch.int32)
    next_free = 0
    for b, seq in enumerate(seqs):
        for i in range(local_pages[b]):
            logical = i * kvp + kvp_rank
            tokens = seq[logical * page_size : (logical + 1) * page_size]
            phys = int(perm[next_free])
            next_free += 1
            cache[phys, : tokens.shape[0]] = tokens
            table[b, i] = phys
    return cache, table

