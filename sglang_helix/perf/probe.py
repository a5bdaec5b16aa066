"""The "cpu" hardware profile: this machine measured, one core per rank (like bench_layer.py).

Measures, single-threaded: fp32 and bf16 matmul FLOP/s on an attention-shaped GEMM
([128 heads x 576] @ [576 x 2048 tokens]), memory bandwidth (copy of a 128 MB tensor: read +
write), and the gloo all_to_all latency / bandwidth between 2 ranks on loopback
(sglang_helix.ranks.run_ranks). Takes ~10-20 s; the result is cached as JSON in
~/.cache/sglang_helix/cpu_profile.json (override with SGLANG_HELIX_CACHE). The CPU torch
attention path computes in fp32 whatever the storage dtype (kernels/torch_decode.py), so the
profile sets attn_precision="fp32".
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from .hardware import HardwareSpec

CACHE_VERSION = 1


def cache_path() -> Path:
    root = os.environ.get("SGLANG_HELIX_CACHE") or os.path.join(Path.home(), ".cache", "sglang_helix")
    return Path(root) / "cpu_profile.json"


def _best_time(fn, iters: int) -> float:
    """Fastest of `iters` runs: other jobs on a shared core only ever slow a run down, so the
    fastest run is the closest to what one uncontended core (one rank) does."""
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def measure_matmul(dtype_name: str, iters: int = 15) -> float:
    """FLOP/s of one thread on [128, 576] @ [576, 2048] in `dtype_name`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(128, 576, dtype=dtype), torch.randn(576, 2048, dtype=dtype)
    secs = _best_time(lambda: torch.matmul(a, b), iters)
    return 2 * 128 * 576 * 2048 / secs


def measure_bandwidth(nbytes: int = 128 << 20, iters: int = 5) -> float:
    """Bytes/s moved (read + write) by one thread copying an nbytes tensor."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    secs = _best_time(lambda: dst.copy_(src), iters)
    return 2 * nbytes / secs


def _a2a_worker(rank: int, world: int, sizes: list[int], iters: int) -> dict:
    import torch
    import torch.distributed as dist

    out = {}
    for size in sizes:
        send = torch.zeros(size // 4 // world * world, dtype=torch.float32)
        recv = torch.empty_like(send)

        def once():
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            return time.perf_counter() - t0

        once()
        out[size] = statistics.median(once() for _ in range(iters))
    return out


def measure_gloo(small: int = 4 << 10, large: int = 8 << 20, iters: int = 9) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s per direction) of a 2-rank gloo all_to_all on loopback."""
    from sglang_helix.ranks import run_ranks

    per_rank = run_ranks(_a2a_worker, 2, args=([small, large], iters), timeout=60.0)
    t_small = min(r[small] for r in per_rank)
    t_large = min(r[large] for r in per_rank)
    bw = (large - small) / 2 / max(t_large - t_small, 1e-9)  # a2a over 2 ranks sends half
    return max(t_small - small / 2 / bw, 0.0), bw


def measure() -> dict:
    """Run every probe (~10-20 s) and return the profile dict (one thread, as one rank)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_all()
    finally:
        torch.set_num_threads(threads)


def _measure_all() -> dict:
    latency, link_bw = measure_gloo()
    return {
        "version": CACHE_VERSION,
        "host": platform.node(),
        "cores": os.cpu_count() or 1,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "flops_fp32": measure_matmul("fp32"),
        "flops_bf16": measure_matmul("bf16"),
        "mem_bw": measure_bandwidth(),
        "link_latency": latency,
        "link_bw": link_bw,
        "mem_total": _mem_total(),
    }


def _mem_total() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16e9


def cpu_profile(refresh: bool = False) -> dict:
    """The cached profile of this host, measuring (and caching) it when absent or stale."""
    path = cache_path()
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CACHE_VERSION and data.get("host") == platform.node():
                return data
        except (OSError, ValueError):
            pass
    data = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def hardware_from_profile(p: dict) -> HardwareSpec:
    """A HardwareSpec where one "GPU" is one core of this machine."""
    cores = int(p["cores"])
    return HardwareSpec(
        "cpu", {"fp32": p["flops_fp32"], "bf16": p["flops_bf16"]}, p["mem_bw"], p["mem_total"] / cores,
        p["link_bw"], p["link_latency"], cores, p["link_bw"], p["link_latency"],
        attn_precision="fp32", source=f"probe of {p['host']} at {p['measured_at']}",
    )


def cpu_hardware(refresh: bool = False) -> HardwareSpec:
    return hardware_from_profile(cpu_profile(refresh))
