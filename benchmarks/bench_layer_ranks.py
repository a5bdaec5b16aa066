"""bench_layer's work on each rank: what a rank holds in each layout (heads, KV heads, tokens),
its random queries and shuffled paged cache, one timed decode step (partial attention, exchange,
merge, W_UV), and the worker that runs every case of one layout on one rank."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch
from models import MODELS, AttentionSpec

from sglang_helix import HelixConfig, sharding
from sglang_helix.attention import partial_attention_gqa, partial_attention_mla, project_values
from sglang_helix.comm import make_exchange, partial_dtype
from sglang_helix.hopb import run_hopb
from sglang_helix.kernels import kv_quant

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SINGLE, HELIX, PLAIN_TP = "1 rank", "helix", "tp"


@dataclass(frozen=True)
class RankShard:
    """What one rank attends: query heads, KV heads it holds, tokens of each request it reads."""

    heads: int
    kv_heads: int
    local_len: int


def kv_torch_dtype(name: str, dtype: str) -> torch.dtype:
    return KV_DTYPES.get(name, DTYPES[dtype])


def plain_tp_kv_heads(spec: AttentionSpec, n: int) -> int:
    """KV heads one plain-TP rank holds: K/N, or one replicated head when N > K (MLA: 1 latent)."""
    return spec.kv_shape.heads_per_rank(n)


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
        cache = torch.randn(batch * pages_per_req, page, spec.kv_shape.elems_per_token(), generator=gen).to(dtype)
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


def kv_bytes_read(spec: AttentionSpec, head_ranks: int, tensors, seq_lens) -> int:
    """KV bytes the attention reads on this rank in one layer: tokens attended x one token's row on
    one of `head_ranks` ranks splitting the KV heads (sglang_helix.kv_size; 1 rank and Helix TPA 1:
    all heads, plain TP N: K / N), at the itemsize of the cache tensors."""
    per_token = spec.kv_shape.elems_per_token(head_ranks) * tensors[-1].element_size()
    return int(seq_lens.sum()) * per_token


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
                            kv_bytes=kv_bytes_read(spec, opts["tpa"], tensors, seq_lens),
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
