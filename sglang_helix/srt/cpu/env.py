"""Environment SGLang 0.5.23 needs to run several CPU ranks (one per Helix rank) on one host.

Facts behind each variable (checked in SGLang 0.5.23's source; docs/sglang-integration.md):

- SGLANG_USE_CPU_ENGINE=1 selects SGLang's CPU engine (gloo groups, native torch paths);
  `sglang.srt.utils.common.is_cpu()` reads it. It must be set before SGLang modules that cache
  `_is_cpu = is_cpu()` are imported; spawned ranks inherit it and import fresh.
- SGLANG_CPU_OMP_THREADS_BIND="c0|c1|..." gives each rank its cores
  (`sglang.srt.utils.numa_utils.init_threads_binding`); unset, SGLang asserts
  ranks <= NUMA nodes, which fails for tp >= 2 on a one-node box. We bind one core per rank.
- SGLANG_NCCL_SO_PATH pointing at a missing file disables pynccl cleanly; otherwise the CUDA torch
  build's bundled libnccl is found and SGLang tries pynccl on a CPU device
  ("Expected a cuda device, but got: cpu").

Only variables the user has not set are changed. `cpu_env_changes` is pure; `apply_cpu_env`
writes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence

USE_CPU_ENGINE = "SGLANG_USE_CPU_ENGINE"
THREADS_BIND = "SGLANG_CPU_OMP_THREADS_BIND"
NCCL_SO_PATH = "SGLANG_NCCL_SO_PATH"
MISSING_NCCL_SO = "/nonexistent/sglang-helix/nccl-disabled-on-cpu/libnccl.so.2"


def threads_bind_value(num_ranks: int, cores: Sequence[int]) -> str:
    """One core per rank, "c0|c1|...": rank r gets cores[r % len(cores)] (wraps if oversubscribed)."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if not cores:
        raise ValueError("cores is empty: no CPU core to bind ranks to")
    ordered = sorted(cores)
    return "|".join(str(ordered[r % len(ordered)]) for r in range(num_ranks))


def cpu_env_changes(
    num_ranks: int, environ: Mapping[str, str], cores: Sequence[int]
) -> dict[str, str]:
    """The variables to set for `num_ranks` CPU ranks, leaving any the user already set."""
    wanted = {
        USE_CPU_ENGINE: "1",
        THREADS_BIND: threads_bind_value(num_ranks, cores),
        NCCL_SO_PATH: MISSING_NCCL_SO,
    }
    return {name: value for name, value in wanted.items() if name not in environ}


def available_cores() -> list[int]:
    """Cores this process may run on (respects taskset / cgroups where the OS exposes them)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def apply_cpu_env(
    num_ranks: int, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set the missing CPU multi-rank variables in `environ` (default os.environ); return them."""
    env = os.environ if environ is None else environ
    changes = cpu_env_changes(num_ranks, env, available_cores())
    env.update(changes)
    return changes
