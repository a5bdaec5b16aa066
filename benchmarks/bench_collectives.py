"""Latency of the bare collectives behind the exchange backends, on CPU ranks over gloo.

    python benchmarks/bench_collectives.py [--world 2] [--iters 30]

Prints, per message size, the median (after 5 warm-up calls) of the slowest rank's time for
all_to_all_single (a2a), all_gather_single and reduce_scatter_single (ag_rs uses both), each
call released by a barrier. The exchanges of docs/results.md are this small, so fixed cost rules.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from sglang_helix.ranks import run_ranks

SIZES = (1024, 16384, 65536, 262144)  # bytes per rank
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _median_ms(op, iters: int) -> float:
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1e3


def rank_fn(rank: int, world: int, iters: int) -> dict:
    out = {}
    for size in SIZES:
        x = torch.randn(size // 4)
        a2a_out, gathered, scattered = torch.empty_like(x), torch.empty(x.numel() * world), torch.empty(x.numel() // world)
        out[size] = (
            _median_ms(lambda: dist.all_to_all_single(a2a_out, x), iters),
            _median_ms(lambda: _GATHER(gathered, x), iters),
            _median_ms(lambda: _SCATTER(scattered, x), iters),
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)
    if args.world < 2 or args.iters < 6:
        p.error("--world must be >= 2 and --iters >= 6")
    per_rank = run_ranks(rank_fn, args.world, args=(args.iters,), timeout=300)
    print(f"{'bytes/rank':>10} {'a2a ms':>8} {'all_gather ms':>13} {'reduce_scatter ms':>17}")
    for size in SIZES:
        worst = [max(r[size][i] for r in per_rank) for i in range(3)]
        print(f"{size:>10} {worst[0]:>8.3f} {worst[1]:>13.3f} {worst[2]:>17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
