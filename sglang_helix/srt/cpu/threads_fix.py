"""CPU-engine fix: each rank runs as many torch threads as the cores SGLang gives it (Helix on or off).

SGLang 0.5.23 reads a rank's cores from SGLANG_CPU_OMP_THREADS_BIND (`numa_utils.
init_threads_binding` -> `local_omp_cpuid`, e.g. "0" or "0-15,32-47"; the plugin sets one core per
rank, srt/cpu/env.py) but applies them (`sgl_kernel.init_cpu_threads_env`) only on AMX or arm64
CPUs. Elsewhere every rank keeps torch's default of one intra-op thread per core of the machine,
so N ranks on N cores run N x N threads whose OpenMP workers spin against each other. Measured on
the 2-core dev VM (tiny MLA, TP 2, one request, 128 output tokens; docs/results.md "Long
contexts"): TPOT p50 74.5 -> 27.1 ms at 4K and 95.7 -> 32.8 ms at 16K with Helix, 76.6 -> 27.3 and
118.7 -> 52.2 ms with plain TP.

Where SGLang skipped the binding, the rank calls torch.set_num_threads(number of its cores) right
after SGLang's own step. Left alone: an explicit OMP_NUM_THREADS (the user's choice), AMX / arm64
CPUs (SGLang binds them itself), GPU servers (SGLang never calls the target off device "cpu").
The hook (AROUND `bootstrap._init_cpu_threads_env`, srt.hook_table) is fix "threads" of
srt.cpu.fixes: installed on the CPU engine only; opt out with SGLANG_HELIX_CPU_THREADS_FIX=0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Callable

logger = logging.getLogger(__name__)


def cpu_count_of(cpuids: Any) -> int:
    """Cores in a SGLANG_CPU_OMP_THREADS_BIND group: "3" -> 1, "0-15,32-47" -> 32, [0, 1] -> 2."""
    if isinstance(cpuids, (list, tuple)):
        return len(cpuids)
    count = 0
    for part in str(cpuids).replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"core range {part!r} runs backwards in SGLANG_CPU_OMP_THREADS_BIND")
        count += last - first + 1
    if count == 0:
        raise ValueError(f"no core in SGLANG_CPU_OMP_THREADS_BIND group {cpuids!r}")
    return count


def threads_to_set(cpuids: Any, sglang_binds: bool, environ: Mapping[str, str]) -> int | None:
    """Torch threads this rank should run, or None to leave torch as it is."""
    if sglang_binds or not cpuids or "OMP_NUM_THREADS" in environ:
        return None
    return cpu_count_of(cpuids)


def _sglang_binds_threads() -> bool:
    from sglang.srt.distributed import bootstrap

    return bool(getattr(bootstrap, "_is_cpu_amx_available", False)
                or getattr(bootstrap, "_is_cpu_arm64", False))


def _around_init_threads(original: Callable, *args, **kwargs):
    result = original(*args, **kwargs)
    cpuids = kwargs.get("local_omp_cpuid", args[0] if args else None)
    threads = threads_to_set(cpuids, _sglang_binds_threads(), os.environ)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        logger.info("sglang_helix: torch threads = %d for this rank's cores %s (SGLang binds "
                    "threads only on AMX / arm64 CPUs; SGLANG_HELIX_CPU_THREADS_FIX=0 to keep "
                    "torch's default)", threads, cpuids)
    return result
