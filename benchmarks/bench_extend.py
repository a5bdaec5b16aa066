"""Prefill (extend) attention on one CPU rank: the two tile primitives of kernels/torch_extend.py.

A Helix extend chunk of n query tokens attends (a) causally over itself and (b) over this rank's
pages of the cached prefix (L local tokens, paged, shuffled physical pages). Both run through
`torch_extend.tiled_attention_lse`; this times them with each tile primitive:

  flash   ATen's fused CPU flash attention per key tile (what CPU runs since 2026-11-28)
  matmul  explicit matmuls + online softmax per query tile (other devices; CPU before)

and prints seconds, the attention rate (GFLOP/s = 2 x n x keys x Hq x (D + Dv) / s, causal half
counted) and the largest difference between the two (both fp32-accumulated). Inputs are bf16
(the pages' dtype on a bf16 model; fp32 models read fp32 pages, pass --dtype fp32).

    python benchmarks/bench_extend.py --models tiny-mla tiny-gqa deepseek-v3-lite \
        --chunk 4096 --prefix 16384 32768 --threads 1

Writes CSV + Markdown to --out-dir (default benchmarks/out). Timings are the minimum of --iters.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MODELS  # noqa: E402

from sglang_helix.kernels import torch_extend  # noqa: E402

# name -> (Hq, Hk, D = key width, Dv); the absorbed-MLA form attends one latent head: D = R + Dr.
SHAPES = {
    "tiny-mla": (4, 1, 56, 48),  # sglang_helix.dev.tiny_models "mla": kv_lora_rank 48, rope 8
    "tiny-gqa": (8, 2, 16, 16),  # tiny Llama: 8 heads, 2 KV heads, head_dim 16
    **{name: ((s.num_heads, 1, s.head_dim + s.rope_dim, s.head_dim) if s.mla
              else (s.num_heads, s.num_kv_heads, s.head_dim, s.head_dim)) for name, s in MODELS.items()},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PAGE = 64


def inputs(shape, n: int, prefix: int, dtype: torch.dtype, seed: int = 0):
    """q [n, Hq, D]; dense chunk keys; paged prefix keys (MLA: v is a view of the key rows)."""
    hq, hk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k_new = torch.randn(n, hk, d, generator=g).to(dtype)
    v_new = k_new[..., :dv] if hk == 1 and dv < d else torch.randn(n, hk, dv, generator=g).to(dtype)
    pages = -(-prefix // PAGE)
    k_pages = torch.randn(pages + 2, PAGE, hk, d, generator=g).to(dtype)
    v_pages = (k_pages[..., :dv] if hk == 1 and dv < d
               else torch.randn(pages + 2, PAGE, hk, dv, generator=g).to(dtype))
    table = torch.randperm(pages + 2, generator=g)[:pages]
    return q, (k_new, v_new), (k_pages, v_pages, table)


def run_once(path: str, q, chunk, paged, prefix: int, scale: float):
    """(seconds, out of chunk part, out of prefix part) with the given tile primitive."""
    saved = torch_extend._SDPA_CPU
    if path == "matmul":
        torch_extend._SDPA_CPU = None
    try:
        dv = chunk[1].shape[-1]
        t0 = time.perf_counter()
        a = torch_extend.tiled_attention_lse(q, torch_extend.dense_fetch(*chunk), q.shape[0], dv,
                                             scale, causal_offset=0)
        b = torch_extend.tiled_attention_lse(q, torch_extend.paged_fetch(*paged, PAGE), prefix, dv,
                                             scale, k_multiple=PAGE) if prefix else None
        return time.perf_counter() - t0, a[0], (b[0] if b else None)
    finally:
        torch_extend._SDPA_CPU = saved


def measure(model: str, n: int, prefix: int, dtype: str, iters: int) -> list[dict]:
    shape = SHAPES[model]
    hq, _, d, dv = shape
    q, chunk, paged = inputs(shape, n, prefix, DTYPES[dtype])
    flops = 2 * hq * (d + dv) * (n * (n + 1) / 2 + n * prefix)
    rows, outs = [], {}
    for path in ("flash", "matmul"):
        best = float("inf")
        for _ in range(iters):
            secs, a, b = run_once(path, q, chunk, paged, prefix, d ** -0.5)
            best = min(best, secs)
        outs[path] = (a, b)
        rows.append(dict(model=model, chunk=n, prefix=prefix, dtype=dtype, path=path,
                         seconds=best, gflops=flops / best / 1e9))
    diff = max((x - y).abs().max().item()
               for x, y in zip(outs["flash"], outs["matmul"]) if x is not None)
    for row in rows:
        row["max_diff"] = diff
        row["speedup"] = rows[1]["seconds"] / row["seconds"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["tiny-mla", "tiny-gqa"])
    p.add_argument("--chunk", type=int, nargs="+", default=[4096])
    p.add_argument("--prefix", type=int, nargs="+", default=[16384])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a server rank on this VM: 1)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if torch_extend._SDPA_CPU is None:
        p.error("this torch has no aten._scaled_dot_product_flash_attention_for_cpu")
    if min(args.chunk) < 1 or min(args.prefix) < 0 or args.iters < 1:
        p.error("--chunk >= 1, --prefix >= 0, --iters >= 1")
    torch.set_num_threads(args.threads)
    rows = [r for m in args.models for n in args.chunk for L in args.prefix
            for r in measure(m, n, L, args.dtype, args.iters)]
    cols = ["model", "chunk", "prefix", "dtype", "path", "seconds", "gflops", "speedup", "max_diff"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "bench_extend.csv").open("w", newline="") as f:
        f.write(f"# command: {' '.join(sys.argv)}\n")
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({c: r[c] for c in cols} for r in rows)
    (args.out_dir / "bench_extend.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
