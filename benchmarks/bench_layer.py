"""Single-layer Helix decode benchmark on CPU ranks (gloo), in the spirit of TensorRT-LLM's.

One rank = one core (torch threads = 1 per rank), the CPU analogue of one GPU: KVP=1 runs the
whole layer's attention on one rank, KVP=2 splits the KV by page over two ranks and exchanges.

    python benchmarks/bench_layer.py --model deepseek-v3 --ctx-len-start 8192 --ctx-len-end 131072 \
        --kvp 1 2 --backend a2a ag_rs

Prints a table (context, partial-attention ms, exchange ms, merge ms, step ms, bytes sent per
rank per step, projected TPOT = step x layers) and writes CSV + PNG into --out-dir.
Times are medians over --iters steps; attention and step take the slowest rank, exchange the
fastest (the rank arriving last at the collective waits only for the communication itself).
With HOP-B slices > 1 the phases interleave, so only the step time is reported. "x-only" is one
exchange + merge timed alone after a barrier (no attention skew), slowest rank.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, AttentionSpec  # noqa: E402

from sglang_helix import HelixConfig, layout  # noqa: E402
from sglang_helix.attention import partial_attention_gqa, partial_attention_mla  # noqa: E402
from sglang_helix.comm import make_exchange  # noqa: E402
from sglang_helix.hopb import run_hopb  # noqa: E402
from sglang_helix.testing import run_ranks  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    model: str
    ctx_len: int
    batch: int
    kvp: int
    tpa: int
    backend: str
    hopb_slices: int
    attn_ms: float
    exchange_ms: float
    merge_ms: float
    step_ms: float
    exch_only_ms: float
    bytes_per_rank: int
    tpot_ms: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="deepseek-v3")
    p.add_argument("--ctx-len-start", type=int, default=8192)
    p.add_argument("--ctx-len-end", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kvp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tpa", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["a2a", "ag_rs"], choices=["a2a", "ag_rs"])
    p.add_argument("--hopb-slices", type=int, nargs="+", default=[1])
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for one group of ranks")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if args.ctx_len_start < 1 or args.ctx_len_end < args.ctx_len_start:
        p.error("--ctx-len-start must be >= 1 and <= --ctx-len-end")
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be >= 1")
    return args


def ctx_lens(start: int, end: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= end:
        out.append(out[-1] * 2)
    return out


def make_inputs(spec: AttentionSpec, cfg: HelixConfig, rank: int, ctx: int, batch: int, dtype, seed: int):
    """Random queries and this rank's shuffled local paged cache for `batch` requests of `ctx` tokens."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    page = cfg.page_size
    local_len = layout.local_seq_len(ctx, cfg.kvp_rank(rank), page, cfg.kvp)
    pages_per_req = max(1, layout.num_pages(local_len, page))
    table = torch.randperm(batch * pages_per_req, generator=gen).reshape(batch, pages_per_req).int()
    seq_lens = torch.full((batch,), local_len, dtype=torch.int32)
    heads = spec.num_heads // cfg.tpa
    if spec.mla:
        cache = torch.randn(batch * pages_per_req, page, spec.kv_dim, generator=gen).to(dtype)
        q_lat = torch.randn(batch, heads, spec.head_dim, generator=gen).to(dtype)
        q_rope = torch.randn(batch, heads, spec.rope_dim, generator=gen).to(dtype)
        return (q_lat, q_rope, cache), table, seq_lens
    kv_heads = spec.num_kv_heads // cfg.tpa
    k = torch.randn(batch * pages_per_req, page, kv_heads, spec.head_dim, generator=gen).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, spec.head_dim, generator=gen).to(dtype)
    return (q, k, v), table, seq_lens


def partial(spec: AttentionSpec, tensors, table, seq_lens, lo: int, hi: int):
    scale = 1.0 / (spec.head_dim + spec.rope_dim) ** 0.5
    if spec.mla:
        q_lat, q_rope, cache = tensors
        return partial_attention_mla(q_lat[lo:hi], q_rope[lo:hi], cache, table[lo:hi], seq_lens[lo:hi], scale)
    q, k, v = tensors
    return partial_attention_gqa(q[lo:hi], k, v, table[lo:hi], seq_lens[lo:hi], scale)


def time_step(spec, cfg, exchange, tensors, table, seq_lens, batch, group) -> tuple[float, float, float, float]:
    """One decode step of one layer on this rank: (attn, exchange, merge, step) seconds."""
    import torch.distributed as dist

    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    if cfg.hopb_slices > 1:
        run_hopb(lambda lo, hi: partial(spec, tensors, table, seq_lens, lo, hi), exchange, batch, cfg.hopb_slices)
        total = time.perf_counter() - t0
        return float("nan"), float("nan"), float("nan"), total
    out, lse = partial(spec, tensors, table, seq_lens, 0, batch)
    t1 = time.perf_counter()
    pending = exchange.start(out, lse)
    pending.wait()
    t2 = time.perf_counter()
    pending.merge()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t3 - t0


def time_exchange_only(exchange, out, lse, group) -> float:
    """Seconds for one exchange (start + wait + merge) with all ranks released together."""
    import torch.distributed as dist

    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    exchange(out, lse)
    return time.perf_counter() - t0


def rank_worker(rank: int, world_size: int, opts: dict) -> list[dict]:
    """Runs every (ctx, backend, slices) case for one KVP size; returns rank-local medians."""
    import torch.distributed as dist

    spec = MODELS[opts["model"]]
    group = dist.group.WORLD if world_size > 1 else None
    results = []
    cases = [(c, b, s) for c in opts["ctx_lens"] for b in opts["backends"] for s in opts["slices"]]
    bar = _progress(len(cases), f"KVP={opts['kvp']}") if rank == 0 else None
    for ctx, backend, slices in cases:
        cfg = HelixConfig(
            kvp=opts["kvp"], tpa=opts["tpa"], num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
            mla=spec.mla, page_size=opts["page_size"], comm_backend=backend, hopb_slices=slices,
        )
        tensors, table, seq_lens = make_inputs(spec, cfg, rank, ctx, opts["batch"], DTYPES[opts["dtype"]], ctx)
        exchange = make_exchange(backend, group, cfg.kvp)
        for _ in range(opts["warmup"]):
            time_step(spec, cfg, exchange, tensors, table, seq_lens, opts["batch"], group)
        exchange.stats.bytes_sent = exchange.stats.calls = 0
        samples = [time_step(spec, cfg, exchange, tensors, table, seq_lens, opts["batch"], group)
                   for _ in range(opts["iters"])]
        bytes_per_step = exchange.stats.bytes_sent // opts["iters"]
        out, lse = partial(spec, tensors, table, seq_lens, 0, opts["batch"])
        exch_only = statistics.median(time_exchange_only(exchange, out, lse, group) for _ in range(opts["iters"]))
        medians = [statistics.median(s[i] for s in samples) for i in range(4)] + [exch_only]
        results.append(dict(ctx_len=ctx, backend=backend, hopb_slices=slices, seconds=medians,
                            bytes_per_step=bytes_per_step))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return results


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr)
    except ImportError:  # progress is cosmetic
        return None


def run_kvp(args, kvp: int) -> list[Row]:
    spec = MODELS[args.model]
    world = kvp * args.tpa
    backends = args.backend if kvp > 1 else ["a2a"]  # one rank: no exchange to compare
    slices = args.hopb_slices if kvp > 1 else [1]
    opts = dict(model=args.model, kvp=kvp, tpa=args.tpa, batch=args.batch, page_size=args.page_size,
                dtype=args.dtype, iters=args.iters, warmup=args.warmup, threads_per_rank=args.threads_per_rank,
                ctx_lens=ctx_lens(args.ctx_len_start, args.ctx_len_end), backends=backends, slices=slices)
    per_rank = run_ranks(rank_worker, world, args=(opts,), timeout=args.timeout, threads=args.threads_per_rank)
    rows = []
    for i, case in enumerate(per_rank[0]):
        # The slowest rank sets attention and step time. The rank that reaches the exchange last
        # waits least, so the smallest exchange time across ranks is the communication itself
        # (the others also wait out the attention skew).
        pick = (max, min, max, max, max)
        secs = [pick[j](r[i]["seconds"][j] for r in per_rank) for j in range(5)]
        ms = [s * 1e3 for s in secs]
        rows.append(Row(args.model, case["ctx_len"], args.batch, kvp, args.tpa,
                        case["backend"] if kvp > 1 else "-", case["hopb_slices"], *ms,
                        max(r[i]["bytes_per_step"] for r in per_rank), ms[3] * spec.num_layers))
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'ctx':>7} {'kvp':>3} {'tpa':>3} {'backend':>7} {'hopb':>4} {'attn ms':>9} {'exch ms':>8} " \
           f"{'merge ms':>8} {'step ms':>9} {'x-only ms':>9} {'bytes/rank':>10} {'TPOT ms':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.ctx_len:>7} {r.kvp:>3} {r.tpa:>3} {r.backend:>7} {r.hopb_slices:>4} {r.attn_ms:>9.2f} "
              f"{r.exchange_ms:>8.3f} {r.merge_ms:>8.3f} {r.step_ms:>9.2f} {r.exch_only_ms:>9.3f} "
              f"{r.bytes_per_rank:>10} {r.tpot_ms:>9.1f}")


def markdown_table(rows: list[Row]) -> str:
    """The printed table as Markdown, for docs/results.md."""
    lines = ["| ctx | KVP | backend | HOP-B | attn ms | exch ms | merge ms | step ms | exch-only ms "
             "| bytes/rank/step | step vs KVP=1 |", "|" + "---|" * 11]
    base = {(r.ctx_len, r.batch): r.step_ms for r in rows if r.kvp == 1}
    for r in rows:
        ratio = r.step_ms / base[(r.ctx_len, r.batch)] if (r.ctx_len, r.batch) in base else float("nan")
        lines.append(f"| {r.ctx_len} | {r.kvp} | {r.backend} | {r.hopb_slices} | {r.attn_ms:.2f} | "
                     f"{r.exchange_ms:.3f} | {r.merge_ms:.3f} | {r.step_ms:.2f} | {r.exch_only_ms:.3f} | "
                     f"{r.bytes_per_rank} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Row], out_dir: Path, stem: str) -> list[Path]:
    """CSV, Markdown table and PNG plot of the rows; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md_path.write_text(markdown_table(rows))
    _plot(rows, png_path)
    return [csv_path, md_path, png_path]


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r.kvp, r.backend, r.hopb_slices) for r in rows})
    for kvp, backend, slices in keys:
        sel = sorted((r for r in rows if (r.kvp, r.backend, r.hopb_slices) == (kvp, backend, slices)),
                     key=lambda r: r.ctx_len)
        label = f"KVP={kvp}" + (f" {backend}" if kvp > 1 else "") + (f" HOP-B {slices}" if slices > 1 else "")
        ax.plot([r.ctx_len for r in sel], [r.step_ms for r in sel], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("single-layer decode step (ms)")
    ax.set_title(f"{rows[0].model}, batch {rows[0].batch}, one CPU core per rank")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for kvp in args.kvp:
        HelixConfig(kvp=kvp, tpa=args.tpa, num_heads=MODELS[args.model].num_heads,
                    num_kv_heads=MODELS[args.model].num_kv_heads, mla=MODELS[args.model].mla)  # fail fast
        rows += run_kvp(args, kvp)
    print_table(rows)
    stem = f"bench_layer_{args.model}_b{args.batch}"
    paths = write_outputs(rows, args.out_dir, stem)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
