"""Single-layer Helix decode benchmark on CPU ranks (gloo), in the spirit of TensorRT-LLM's.

One rank = one core (torch threads = 1 per rank), the CPU analogue of one GPU. Three layouts of
the same attention layer:

- "1 rank": the whole layer's attention on one rank (Helix KVP=1, TPA=1: no exchange; the
  trivial one-partial merge is timed as "merge").
- "helix": KVP x TPA = N ranks; the KV is split by page over the KVP ranks (and by KV head over
  TPA), each rank runs partial attention over its pages, then one exchange + LSE merge.
- "tp": plain tensor parallelism on the same N ranks (what SGLang does without Helix): the query
  heads are split N ways and each rank attends its H/N heads over the FULL sequence, no
  exchange. GQA: each rank holds K/N KV heads, or one replicated KV head when N > K (needs
  K % N == 0 or N % K == 0). MLA: the latent (R + Dr per token) is replicated on every rank.
  SGLang then all-reduces after o_proj; that all-reduce is outside the attention layer and is
  not timed here (Helix has an o_proj all-reduce too, after its exchange).

    python benchmarks/bench_layer.py --model deepseek-v3 --ctx-len-start 8192 --ctx-len-end 131072 \
        --kvp 1 2 --backend a2a ag_rs

Every Helix size N = KVP x TPA > 1 also runs plain TP N (--no-plain-tp skips it). Prints a table
(layout, ranks N, context, partial-attention ms, exchange ms, merge ms, step ms, exchange bytes
sent per rank per step, KV bytes read per rank per step, projected TPOT = step x layers) and
writes CSV + Markdown + PNG into --out-dir. "KV bytes/rank" is the KV cache one rank reads in
one decode step of one layer for the whole batch (tokens it attends x its KV heads x
(D + Dv), or x (R + Dr) for MLA, x itemsize): Helix divides the tokens by KVP, plain TP divides
the KV heads by N (GQA, N <= K) or nothing (MLA; GQA with N > K replicates a head).
Times are medians over --iters steps; attention and step take the slowest rank, exchange the
fastest (the rank arriving last at the collective waits only for the communication itself).
With HOP-B slices > 1 the phases interleave, so only the step time is reported. "x-only" is one
exchange + merge timed alone after a barrier (no attention skew), slowest rank.

MLA exchange (--mla-exchange latent value, MLA models only; docs/math.md section 4): every row
then also runs W_UV ([R] -> [v_head_dim] per head, bf16 weights like the activations), timed as
"W_UV ms" and included in the step: "latent" Helix rows exchange the R-wide latent and apply
W_UV to their H/N merged heads after the merge; "value" rows apply W_UV of all H heads to the
rank's partial before the exchange, which then moves v_head_dim per head. The 1 rank and plain
TP rows apply W_UV to the heads they output (H, H/N) after attention (column "latent"). Without
the flag no W_UV runs and the column reads "-".

    python benchmarks/bench_layer.py --model deepseek-v3 --kvp 2 --mla-exchange latent value \
        --ctx-len-start 8192 --ctx-len-end 32768 --backend a2a --hopb-slices 1 2 --batch 1

KV cache dtype (--kv-dtype fp8, i.e. fp8_e4m3, or fp8_e5m2; "auto" = --dtype): every layout runs
once per KV dtype, the pages stored in it (fp8: SGLang's convention, scale 1) and read by the same
kernels (fp8 tiles upcast inside them); queries stay in --dtype, partials in --exchange-dtype. The
--dtype rows are always run as the baseline. Extra columns: the KV dtype, "KV vs <dtype>" = this
row's KV bytes read per rank over the same row's with KV in --dtype (fp8: 0.50), and in the CSV
kv_cache_bytes_per_rank = bytes of the cache tensors the rank really holds (numel x itemsize).

    python benchmarks/bench_layer.py --model deepseek-v3 --kvp 1 2 --kv-dtype fp8 \
        --ctx-len-start 8192 --ctx-len-end 32768 --backend a2a
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

from sglang_helix import HelixConfig, sharding  # noqa: E402
from sglang_helix.attention import partial_attention_gqa, partial_attention_mla, project_values  # noqa: E402
from sglang_helix.comm import make_exchange, partial_dtype  # noqa: E402
from sglang_helix.config import DEFAULT_EXCHANGE_DTYPE, EXCHANGE_DTYPES  # noqa: E402
from sglang_helix.hopb import run_hopb  # noqa: E402
from sglang_helix.kernels import kv_quant  # noqa: E402
from sglang_helix.ranks import run_ranks  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
KV_ALIASES = {"fp8": "fp8_e4m3"}
SINGLE, HELIX, PLAIN_TP = "1 rank", "helix", "tp"


@dataclass
class Row:
    model: str
    layout: str  # "1 rank" | "helix" | "tp"
    ranks: int  # N: ranks running the layer's attention
    ctx_len: int
    batch: int
    kvp: int
    tpa: int  # plain TP rows: the TP size N
    backend: str
    hopb_slices: int
    attn_ms: float
    exchange_ms: float
    merge_ms: float
    step_ms: float
    exch_only_ms: float
    bytes_per_rank: int  # exchange bytes one rank sends per step (0 without exchange)
    kv_bytes_per_rank: int  # KV bytes one rank reads per step (one layer, whole batch), max rank
    tpot_ms: float
    mla_exchange: str = "-"  # "latent" | "value" with --mla-exchange (W_UV timed), else "-"
    wuv_ms: float = 0.0  # W_UV time inside step_ms (value: before the exchange; latent: after)
    kv_dtype: str = "-"  # with --kv-dtype: the pages' dtype ("bf16", "fp8_e4m3", ...), else "-"
    kv_cache_bytes_per_rank: int = 0  # bytes of the cache tensors one rank holds (max rank)
    kv_ratio: float = float("nan")  # KV bytes read / the same row's with KV in --dtype


@dataclass(frozen=True)
class RankShard:
    """What one rank attends: query heads, KV heads it holds, tokens of each request it reads."""

    heads: int
    kv_heads: int
    local_len: int


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
    p.add_argument("--plain-tp", action=argparse.BooleanOptionalAction, default=True,
                   help="also run plain TP on N = KVP x TPA ranks for every Helix N > 1 (default on)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for one group of ranks")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--mla-exchange", nargs="+", choices=["latent", "value"], default=None,
                   help="MLA only: time W_UV too and run every Helix layout with each exchange "
                        "(module doc)")
    p.add_argument("--exchange-dtype", choices=list(EXCHANGE_DTYPES), default=DEFAULT_EXCHANGE_DTYPE,
                   help="dtype of the exchanged partials, as --helix-exchange-dtype (fp32: 4 bytes "
                        "per element; activation: --dtype)")
    p.add_argument("--kv-dtype", nargs="+", default=None,
                   choices=["auto", *KV_ALIASES, *KV_DTYPES],
                   help="KV cache dtypes to run every layout with (fp8 = fp8_e4m3; auto = --dtype, "
                        "always run as the baseline when any is given; module doc)")
    args = p.parse_args(argv)
    args.kv_dtypes = kv_dtype_names(args.kv_dtype, args.dtype)
    if args.ctx_len_start < 1 or args.ctx_len_end < args.ctx_len_start:
        p.error("--ctx-len-start must be >= 1 and <= --ctx-len-end")
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be >= 1")
    spec = MODELS[args.model]
    if args.mla_exchange and not spec.mla:
        p.error(f"--mla-exchange applies to MLA models; {args.model} is GQA")
    for n in plain_tp_sizes(args):
        why = plain_tp_problem(spec, n)
        if why:
            p.error(f"plain TP {n} for {args.model}: {why} (pass --no-plain-tp to skip it)")
    return args


def kv_dtype_names(requested, dtype: str) -> list[str]:
    """KV dtypes to run: ["-"] (the activation dtype, no KV columns) without --kv-dtype; else
    --dtype first (the baseline), then the others as given, each once."""
    if not requested:
        return ["-"]
    names = [dtype] + [dtype if n == "auto" else KV_ALIASES.get(n, n) for n in requested]
    return list(dict.fromkeys(names))


def kv_torch_dtype(name: str, dtype: str) -> torch.dtype:
    return KV_DTYPES.get(name, DTYPES[dtype])


def ctx_lens(start: int, end: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= end:
        out.append(out[-1] * 2)
    return out


def plain_tp_sizes(args) -> list[int]:
    """TP sizes of the plain-TP baseline: every Helix N = KVP x TPA > 1, once each."""
    if not args.plain_tp:
        return []
    return sorted({k * args.tpa for k in args.kvp if k * args.tpa > 1})


def plain_tp_problem(spec: AttentionSpec, n: int) -> str:
    """Why plain TP n cannot shard `spec`'s heads ("" if it can)."""
    if spec.num_heads % n:
        return f"{spec.num_heads} query heads are not divisible by {n}"
    k = spec.num_kv_heads
    if not spec.mla and k % n and n % k:
        return f"{k} KV heads neither divide nor are divisible by {n}"
    return ""


def plain_tp_kv_heads(spec: AttentionSpec, n: int) -> int:
    """KV heads one plain-TP rank holds: K/N, or one replicated head when N > K (MLA: 1 latent)."""
    return 1 if spec.mla else max(1, spec.num_kv_heads // n)


def rank_shard(spec: AttentionSpec, opts: dict, rank: int, ctx: int) -> RankShard:
    """Heads and tokens of global rank `rank` in the layout opts["layout"]."""
    if opts["layout"] == PLAIN_TP:
        n = opts["tpa"]
        return RankShard(spec.num_heads // n, plain_tp_kv_heads(spec, n), ctx)
    kvp, tpa, page = opts["kvp"], opts["tpa"], opts["page_size"]
    cfg = HelixConfig(kvp=kvp, tpa=tpa, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                      mla=spec.mla, page_size=page)
    local_len = int(sharding.local_seq_len(ctx, cfg.kvp_rank(rank), page, kvp))
    return RankShard(spec.num_heads // tpa, spec.num_kv_heads // tpa, local_len)


def make_inputs(spec: AttentionSpec, shard: RankShard, page: int, rank: int, batch: int, dtype, seed: int,
                kv_dtype=None):
    """Random queries and this rank's shuffled paged cache for `batch` requests of shard.local_len
    tokens each: (tensors, page_table, seq_lens). kv_dtype: the pages' dtype (default `dtype`;
    fp8 pages are stored as SGLang stores them, scale 1)."""
    tensors, table, seq_lens = _make_inputs(spec, shard, page, rank, batch, dtype, seed)
    if kv_dtype is None or kv_dtype == dtype:
        return tensors, table, seq_lens
    caches = tuple(kv_quant.quantize(t, kv_dtype) for t in tensors[-(1 if spec.mla else 2):])
    return tensors[:(2 if spec.mla else 1)] + caches, table, seq_lens


def _make_inputs(spec: AttentionSpec, shard: RankShard, page: int, rank: int, batch: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    pages_per_req = max(1, sharding.num_pages(shard.local_len, page))
    table = torch.randperm(batch * pages_per_req, generator=gen).reshape(batch, pages_per_req).int()
    seq_lens = torch.full((batch,), shard.local_len, dtype=torch.int32)
    if spec.mla:
        cache = torch.randn(batch * pages_per_req, page, spec.kv_dim, generator=gen).to(dtype)
        q_lat = torch.randn(batch, shard.heads, spec.head_dim, generator=gen).to(dtype)
        q_rope = torch.randn(batch, shard.heads, spec.rope_dim, generator=gen).to(dtype)
        return (q_lat, q_rope, cache), table, seq_lens
    k = torch.randn(batch * pages_per_req, page, shard.kv_heads, spec.head_dim, generator=gen).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, shard.heads, spec.head_dim, generator=gen).to(dtype)
    return (q, k, v), table, seq_lens


def kv_cache_bytes(spec: AttentionSpec, tensors) -> int:
    """Bytes of the KV cache tensors this rank holds (numel x itemsize)."""
    caches = tensors[2:] if spec.mla else tensors[1:]
    return sum(t.numel() * t.element_size() for t in caches)


def kv_bytes_read(spec: AttentionSpec, tensors, seq_lens) -> int:
    """KV bytes the attention reads on this rank: tokens attended x cached bytes per token
    (taken from the cache tensors themselves)."""
    tokens = int(seq_lens.sum())
    if spec.mla:
        cache = tensors[2]
        return tokens * cache.shape[-1] * cache.element_size()
    k, v = tensors[1], tensors[2]
    return tokens * k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size()


def partial(spec: AttentionSpec, tensors, table, seq_lens, lo: int, hi: int, out_dtype=None):
    """Partial attention of requests [lo, hi); out in out_dtype (default the activation dtype;
    torch.float32 where it goes to the exchange, as sglang_helix.decode sends it)."""
    scale = 1.0 / (spec.head_dim + spec.rope_dim) ** 0.5
    if spec.mla:
        q_lat, q_rope, cache = tensors
        return partial_attention_mla(q_lat[lo:hi], q_rope[lo:hi], cache, table[lo:hi], seq_lens[lo:hi], scale,
                                     out_dtype=out_dtype)
    q, k, v = tensors
    return partial_attention_gqa(q[lo:hi], k, v, table[lo:hi], seq_lens[lo:hi], scale, out_dtype=out_dtype)


def value_partial(spec, tensors, table, seq_lens, lo: int, hi: int, w_uv, sent=torch.float32):
    """The partial that goes to the exchange, in `sent` (--exchange-dtype): partial(), then W_UV
    of all heads on it when w_uv is given (the value exchange)."""
    out, lse = partial(spec, tensors, table, seq_lens, lo, hi, sent)
    return (out, lse) if w_uv is None else (project_values(out, w_uv, sent), lse)


def time_step(spec, hopb_slices, exchange, tensors, table, seq_lens, batch, group,
              w_uv=None, mode="-", sent=torch.float32) -> tuple[float, float, float, float, float]:
    """One decode step of one layer on this rank: (attn, exchange, merge, step, W_UV) seconds.
    exchange None (plain TP): attention over the whole sequence is the step. w_uv (MLA, with
    --mla-exchange): W_UV of the output heads after the merge (mode "latent"), or of all heads
    on the partial before the exchange ("value"); included in step. sent: the exchanged
    partials' dtype (--exchange-dtype, as sglang_helix.comm.partial_dtype picks it)."""
    import torch.distributed as dist

    before = w_uv if mode == "value" else None  # value: projected inside the partial
    after = w_uv if mode == "latent" else None
    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    if exchange is None:
        out, _ = partial(spec, tensors, table, seq_lens, 0, batch)
        t1 = time.perf_counter()
        if after is not None:
            project_values(out, after)
        total = time.perf_counter() - t0
        return t1 - t0, 0.0, 0.0, total, total - (t1 - t0)
    if hopb_slices > 1:
        merged = run_hopb(lambda lo, hi: value_partial(spec, tensors, table, seq_lens, lo, hi, before, sent),
                          exchange, batch, hopb_slices)
        if after is not None:
            project_values(merged, after)
        total = time.perf_counter() - t0
        return float("nan"), float("nan"), float("nan"), total, float("nan")
    out, lse = partial(spec, tensors, table, seq_lens, 0, batch, sent)
    t1 = time.perf_counter()
    if before is not None:
        out = project_values(out, before, sent)
    t1b = time.perf_counter()
    pending = exchange.start(out, lse)
    pending.wait()
    t2 = time.perf_counter()
    merged = pending.merge()
    t3 = time.perf_counter()
    if after is not None:
        project_values(merged, after)
    t4 = time.perf_counter()
    return t1 - t0, t2 - t1b, t3 - t2, t4 - t0, (t1b - t1) + (t4 - t3)


def w_uv_for(spec: AttentionSpec, opts: dict, world: int, mode: str, rank: int):
    """Random bf16-like W_UV [heads, R, Dv] for this row (None without --mla-exchange): all H
    heads for "value" and the single rank, H/N for "latent" Helix and plain TP."""
    if mode == "-":
        return None
    heads = spec.num_heads if mode == "value" or world == 1 else spec.num_heads // world
    gen = torch.Generator().manual_seed(7 + rank)
    w = torch.randn(heads, spec.head_dim, spec.v_head_dim, generator=gen) * spec.head_dim ** -0.5
    return w.to(DTYPES[opts["dtype"]])


def time_exchange_only(exchange, out, lse, group) -> float:
    """Seconds for one exchange (start + wait + merge) with all ranks released together."""
    import torch.distributed as dist

    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    exchange(out, lse)
    return time.perf_counter() - t0


def rank_worker(rank: int, world_size: int, opts: dict) -> list[dict]:
    """Runs every (ctx, backend, slices) case for one layout; returns rank-local medians."""
    import torch.distributed as dist

    spec = MODELS[opts["model"]]
    group = dist.group.WORLD if world_size > 1 else None
    plain = opts["layout"] == PLAIN_TP
    results = []
    cases = [(c, b, s, m) for c in opts["ctx_lens"] for b in opts["backends"] for s in opts["slices"]
             for m in opts.get("modes", ["-"])]
    bar = _progress(len(cases), opts["label"]) if rank == 0 else None
    for ctx, backend, slices, mode in cases:
        shard = rank_shard(spec, opts, rank, ctx)
        tensors, table, seq_lens = make_inputs(spec, shard, opts["page_size"], rank, opts["batch"],
                                               DTYPES[opts["dtype"]], ctx,
                                               kv_torch_dtype(opts["kv_dtype"], opts["dtype"]))
        exchange = None if plain else make_exchange(backend, group, opts["kvp"])
        w_uv = w_uv_for(spec, opts, world_size, mode, rank)
        sent = partial_dtype(opts["exchange_dtype"], DTYPES[opts["dtype"]])
        step = lambda: time_step(spec, slices, exchange, tensors, table, seq_lens,  # noqa: E731
                                 opts["batch"], group, w_uv, mode, sent)
        for _ in range(opts["warmup"]):
            step()
        if exchange is not None:
            exchange.stats.bytes_sent = exchange.stats.calls = 0
        samples = [step() for _ in range(opts["iters"])]
        if exchange is None:
            bytes_per_step, exch_only = 0, 0.0
        else:
            bytes_per_step = exchange.stats.bytes_sent // opts["iters"]
            out, lse = value_partial(spec, tensors, table, seq_lens, 0, opts["batch"],
                                     w_uv if mode == "value" else None, sent)
            exch_only = statistics.median(time_exchange_only(exchange, out, lse, group)
                                          for _ in range(opts["iters"]))
        medians = [statistics.median(s[i] for s in samples) for i in range(4)] + [exch_only]
        medians.append(statistics.median(s[4] for s in samples))
        results.append(dict(ctx_len=ctx, backend=backend, hopb_slices=slices, mode=mode,
                            seconds=medians, bytes_per_step=bytes_per_step,
                            kv_bytes=kv_bytes_read(spec, tensors, seq_lens),
                            kv_cache_bytes=kv_cache_bytes(spec, tensors)))
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


def run_layout(args, layout: str, kvp: int, tpa: int, kv_dtype: str = "-") -> list[Row]:
    """All contexts of one layout: Helix KVP x TPA (layout "1 rank" when both are 1) or plain
    TP on tpa ranks (kvp 1); kv_dtype: the pages' dtype name ("-": --dtype, no KV columns)."""
    spec = MODELS[args.model]
    world = kvp * tpa
    exchanging = layout == HELIX
    backends = args.backend if exchanging else ["a2a"]  # no exchange to compare
    slices = args.hopb_slices if exchanging else [1]
    modes = args.mla_exchange if exchanging and args.mla_exchange else (
        ["latent"] if args.mla_exchange else ["-"])
    label = {SINGLE: "1 rank", HELIX: f"Helix KVP={kvp} TPA={tpa}", PLAIN_TP: f"plain TP {tpa}"}[layout]
    label += f" KV {kv_dtype}" if kv_dtype != "-" else ""
    opts = dict(model=args.model, layout=layout, label=label, kvp=kvp, tpa=tpa, batch=args.batch, kv_dtype=kv_dtype,
                page_size=args.page_size, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
                ctx_lens=ctx_lens(args.ctx_len_start, args.ctx_len_end), backends=backends, slices=slices,
                modes=modes, exchange_dtype=args.exchange_dtype)
    per_rank = run_ranks(rank_worker, world, args=(opts,), timeout=args.timeout, threads=args.threads_per_rank)
    rows = []
    for i, case in enumerate(per_rank[0]):
        # The slowest rank sets attention and step time. The rank that reaches the exchange last
        # waits least, so the smallest exchange time across ranks is the communication itself
        # (the others also wait out the attention skew).
        pick = (max, min, max, max, max, max)
        secs = [pick[j](r[i]["seconds"][j] for r in per_rank) for j in range(6)]
        ms = [s * 1e3 for s in secs]
        rows.append(Row(args.model, layout, world, case["ctx_len"], args.batch, kvp, tpa,
                        case["backend"] if exchanging and kvp > 1 else "-", case["hopb_slices"],
                        *ms[:5], max(r[i]["bytes_per_step"] for r in per_rank),
                        max(r[i]["kv_bytes"] for r in per_rank), ms[3] * spec.num_layers,
                        mla_exchange=case["mode"], wuv_ms=ms[5], kv_dtype=kv_dtype,
                        kv_cache_bytes_per_rank=max(r[i]["kv_cache_bytes"] for r in per_rank)))
    return rows


def _case_key(r: Row) -> tuple:
    return (r.layout, r.ranks, r.kvp, r.tpa, r.ctx_len, r.backend, r.hopb_slices, r.mla_exchange)


def set_kv_ratios(rows: list[Row], dtype: str) -> None:
    """kv_ratio of every --kv-dtype row: its KV bytes read over the same case's --dtype row's."""
    base = {_case_key(r): r.kv_bytes_per_rank for r in rows if r.kv_dtype == dtype}
    for r in rows:
        if r.kv_dtype != "-" and base.get(_case_key(r)):
            r.kv_ratio = r.kv_bytes_per_rank / base[_case_key(r)]


def layout_label(r: Row) -> str:
    if r.layout == PLAIN_TP:
        return f"plain TP {r.ranks}"
    if r.layout == SINGLE:
        return "1 rank"
    tpa = f" x TPA {r.tpa}" if r.tpa > 1 else ""
    return f"Helix KVP {r.kvp}{tpa}"


def _with_w_uv(rows: list[Row]) -> bool:
    """True when the rows were run with --mla-exchange (extra columns: MLA exchange, W_UV ms)."""
    return any(r.mla_exchange != "-" for r in rows)


def _with_kv_dtype(rows: list[Row]) -> bool:
    """True when the rows were run with --kv-dtype (extra columns: KV dtype, KV vs --dtype)."""
    return any(r.kv_dtype != "-" for r in rows)


def _base_dtype(rows: list[Row]) -> str:
    return next((r.kv_dtype for r in rows if r.kv_dtype in DTYPES), "bf16")


def print_table(rows: list[Row]) -> None:
    mla = _with_w_uv(rows)
    head = f"{'layout':>16} {'N':>2} {'ctx':>7} {'backend':>7} {'hopb':>4} {'attn ms':>9} {'exch ms':>8} " \
           f"{'merge ms':>8} {'step ms':>9} {'x-only ms':>9} {'exch B/rank':>11} {'KV B/rank':>12} {'TPOT ms':>9}"
    head += f" {'MLA x':>6} {'W_UV ms':>8}" if mla else ""
    kv = _with_kv_dtype(rows)
    head += f" {'KV dtype':>9} {'KV vs ' + _base_dtype(rows):>10}" if kv else ""
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = f" {r.mla_exchange:>6} {r.wuv_ms:>8.3f}" if mla else ""
        extra += f" {r.kv_dtype:>9} {r.kv_ratio:>10.2f}" if kv else ""
        print(f"{layout_label(r):>16} {r.ranks:>2} {r.ctx_len:>7} {r.backend:>7} {r.hopb_slices:>4} "
              f"{r.attn_ms:>9.2f} {r.exchange_ms:>8.3f} {r.merge_ms:>8.3f} {r.step_ms:>9.2f} "
              f"{r.exch_only_ms:>9.3f} {r.bytes_per_rank:>11} {r.kv_bytes_per_rank:>12} {r.tpot_ms:>9.1f}"
              + extra)


def _ratio(num: float, den) -> str:
    return "-" if den is None else f"{num / den:.2f}"


def markdown_table(rows: list[Row]) -> str:
    """The printed table as Markdown, for docs/results.md."""
    mla, kv = _with_w_uv(rows), _with_kv_dtype(rows)
    lines = ["| layout | N | ctx | backend | HOP-B | attn ms | exch ms | merge ms | step ms | exch-only ms "
             "| exch bytes/rank/step | KV bytes/rank/step | step vs 1 rank | step vs plain TP N |"
             + (" MLA exchange | W_UV ms |" if mla else "")
             + (f" KV dtype | KV bytes vs {_base_dtype(rows)} | KV cache bytes/rank |" if kv else ""),
             "|" + "---|" * (14 + 2 * mla + 3 * kv)]
    single = {(r.ctx_len, r.batch, r.kv_dtype): r.step_ms for r in rows if r.layout == SINGLE}
    plain = {(r.ctx_len, r.batch, r.ranks, r.kv_dtype): r.step_ms for r in rows if r.layout == PLAIN_TP}
    for r in rows:
        vs1 = _ratio(r.step_ms, single.get((r.ctx_len, r.batch, r.kv_dtype)))
        vs_tp = _ratio(r.step_ms, plain.get((r.ctx_len, r.batch, r.ranks, r.kv_dtype)))
        lines.append(f"| {layout_label(r)} | {r.ranks} | {r.ctx_len} | {r.backend} | {r.hopb_slices} | "
                     f"{r.attn_ms:.2f} | {r.exchange_ms:.3f} | {r.merge_ms:.3f} | {r.step_ms:.2f} | "
                     f"{r.exch_only_ms:.3f} | {r.bytes_per_rank:,} | {r.kv_bytes_per_rank:,} | {vs1} | {vs_tp} |"
                     + (f" {r.mla_exchange} | {r.wuv_ms:.3f} |" if mla else "")
                     + (f" {r.kv_dtype} | {r.kv_ratio:.2f} | {r.kv_cache_bytes_per_rank:,} |" if kv else ""))
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Row], out_dir: Path, stem: str) -> list[Path]:
    """CSV, Markdown table and PNG plot of the rows; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    fields = list(asdict(rows[0]))
    if not _with_w_uv(rows):  # runs without --mla-exchange keep the columns they always had
        fields = [f for f in fields if f not in ("mla_exchange", "wuv_ms")]
    if not _with_kv_dtype(rows):  # likewise without --kv-dtype
        fields = [f for f in fields if f not in ("kv_dtype", "kv_cache_bytes_per_rank", "kv_ratio")]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md_path.write_text(markdown_table(rows))
    _plot(rows, png_path)
    return [csv_path, md_path, png_path]


def _series_label(r: Row) -> str:
    label = layout_label(r)
    if r.layout == HELIX and r.kvp > 1:
        label += f" {r.backend}"
        label += f" {r.mla_exchange}" if r.mla_exchange != "-" else ""
    label += f" KV {r.kv_dtype}" if r.kv_dtype != "-" else ""
    return label + (f" HOP-B {r.hopb_slices}" if r.hopb_slices > 1 else "")


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_kv) = plt.subplots(1, 2, figsize=(12, 4.5))
    order = {SINGLE: 0, HELIX: 1, PLAIN_TP: 2}
    key = lambda r: (order[r.layout], r.ranks, r.kvp, r.backend, r.hopb_slices, r.mla_exchange,  # noqa: E731
                     r.kv_dtype)
    for o, ranks, kvp, backend, slices, mode, kv_dtype in sorted({key(r) for r in rows}):
        sel = sorted((r for r in rows if key(r) == (o, ranks, kvp, backend, slices, mode, kv_dtype)),
                     key=lambda r: r.ctx_len)
        # 1 rank: hollow circles, plain TP: dashed crosses (they overlap in the KV panel for MLA)
        style = [dict(ls="-", marker="o", ms=9, mfc="none"), dict(ls="-", marker="o"),
                 dict(ls="--", marker="x", ms=8)][o]
        xs = [r.ctx_len for r in sel]
        ax.plot(xs, [r.step_ms for r in sel], label=_series_label(sel[0]), **style)
        if slices == 1 and backend in ("-", "a2a") and mode in ("-", "latent"):
            kv_label = layout_label(sel[0]) + (f" KV {kv_dtype}" if kv_dtype != "-" else "")
            ax_kv.plot(xs, [r.kv_bytes_per_rank / 2**20 for r in sel], label=kv_label, **style)
    for a in (ax, ax_kv):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context length (tokens)")
        a.grid(True, alpha=0.3)
        a.legend()
    ax.set_ylabel("single-layer decode step (ms)")
    ax_kv.set_ylabel("KV read per rank per step (MiB)")
    fig.suptitle(f"{rows[0].model}, batch {rows[0].batch}, one CPU core per rank: "
                 f"Helix vs plain TP vs 1 rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = MODELS[args.model]
    rows = []
    for kvp in args.kvp:
        HelixConfig(kvp=kvp, tpa=args.tpa, num_heads=spec.num_heads,
                    num_kv_heads=spec.num_kv_heads, mla=spec.mla)  # fail fast
        layout = SINGLE if kvp * args.tpa == 1 else HELIX
        for kv_dtype in args.kv_dtypes:
            rows += run_layout(args, layout, kvp, args.tpa, kv_dtype)
    for n in plain_tp_sizes(args):
        for kv_dtype in args.kv_dtypes:
            rows += run_layout(args, PLAIN_TP, 1, n, kv_dtype)
    set_kv_ratios(rows, args.dtype)
    print_table(rows)
    stem = f"bench_layer_{args.model}_b{args.batch}"
    paths = write_outputs(rows, args.out_dir, stem)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
