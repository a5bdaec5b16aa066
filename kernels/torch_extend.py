"""Tiled torch attention with LSE for extend (prefill) queries: the CPU production path.

One algorithm serves both halves of a Helix extend, for GQA and absorbed MLA alike:
- the chunk's causal self-attention (keys = the chunk's own new K/V, dense), and
- the partial over this rank's pages of a cached prefix (keys gathered page by page).
Keys are fetched in tiles (each prefix page read once per query tile) and tiles are combined by
their LSEs, so nothing of size n x n (or n x prefix) is materialised. A tile's attention is, on
CPU, ATen's fused flash attention (`_scaled_dot_product_flash_attention_for_cpu`: blocked
online softmax in fp32, returns the natural-log LSE; about 2x the rate of the matmul / exp
passes on 2 AVX-512 cores, docs/results.md "Long contexts"), elsewhere (or without that op)
explicit matmuls with an online softmax per query tile.
Accumulation is fp32; out comes back fp32, lse natural log fp32 (-inf where a query sees no key).
Keys may be fp8 pages (kv_quant): each fetched tile is upcast on its own, k_scale folded into the
query scale and v_scale into the output; no pool is dequantized.
Contract and ground truth: reference.attention_lse_ref.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kv_quant import upcast
from .reference import fill_by_request
from .torch_decode import _OnlineSoftmax

# fp32 elements of one scores tile [Hq, q_tile, k_tile] (matmul path) or of one fetched fp32
# K/V tile (flash path): ~16 MB, unless _MIN_K_TILE keys are more (many heads).
_TILE_ELEMS = 4 * 1024 * 1024
_Q_TILE = 512
_MIN_K_TILE = 256
# ATen's fused CPU flash attention (q, k, v same dtype and head size; no empty q or k).
_SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

KeyFetch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _k_tile(heads: int, q_tile: int, multiple: int) -> int:
    tokens = max(_MIN_K_TILE, _TILE_ELEMS // max(1, heads * q_tile))
    return max(multiple, tokens // multiple * multiple)


def tiled_attention_lse(q: torch.Tensor, fetch: KeyFetch, length: int, dv: int, scale: float, *,
                        causal_offset: int | None = None, k_multiple: int = 1,
                        k_scale: float = 1.0, v_scale: float = 1.0):
    """Attention of q [n, Hq, D] over `length` keys supplied tile by tile, with the LSE.

    fetch(k0, k1) -> (k [k1-k0, Hk, D], v [k1-k0, Hk, Dv]) for keys [k0, k1); Hq % Hk == 0;
    fp8 tiles are read as k * k_scale, v * v_scale (kv_quant).
    causal_offset c >= 0: query i sees keys 0 .. i + c (None: all keys). k_multiple: key tiles
    start at multiples of it (the page size, so a paged fetch gathers whole pages).
    Returns out [n, Hq, Dv] fp32 (0 where a query sees no key) and lse [n, Hq] fp32 (-inf there).
    """
    n, hq, _ = q.shape
    if causal_offset is not None and causal_offset < 0:
        raise ValueError(f"causal_offset must be >= 0 or None, got {causal_offset}")
    out = torch.zeros(n, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0 or length <= 0:
        return out, lse
    flash = q.device.type == "cpu" and _SDPA_CPU is not None
    tile = _flash_query_tile if flash else _query_tile
    # Without a mask the flash kernel blocks the queries itself: one tile reads each key once.
    q_step = n if flash and causal_offset is None else _Q_TILE
    for q0 in range(0, n, q_step):
        q1 = min(n, q0 + q_step)
        stop = length if causal_offset is None else min(length, q1 + causal_offset)
        tile(q[q0:q1], q0, fetch, stop, scale * k_scale, causal_offset, k_multiple,
             out[q0:q1], lse[q0:q1])
    if v_scale != 1.0:
        out.mul_(v_scale)
    return out, lse


def _flash_query_tile(q, q0, fetch, stop, scale, causal_offset, k_multiple, out, lse) -> None:
    """One query tile by fused flash attention: the keys every query of the tile sees
    ([0, q0 + c), or all) in key tiles without a mask, then the causal square [q0 + c, stop),
    top-left aligned (query i of the tile sees its keys 0..i). Every query sees at least one key
    of each call, so no row is empty; the calls are combined by their LSEs."""
    open_end = stop if causal_offset is None else min(stop, q0 + causal_offset)
    acc = None
    if open_end > 0:
        k, v = fetch(0, min(open_end, k_multiple))  # one page: the per-key width
        step = _k_tile(k.shape[1] * (k.shape[2] + v.shape[2]), 1, k_multiple)
        for k0 in range(0, open_end, step):
            k1 = min(open_end, k0 + step)
            acc = _combine(acc, _flash(q, *_fetch_range(fetch, k0, k1, k_multiple), scale, False))
    if stop > open_end:
        acc = _combine(acc, _flash(q, *_fetch_range(fetch, open_end, stop, k_multiple), scale, True))
    out.copy_(acc[0])
    lse.copy_(acc[1])


def _fetch_range(fetch: KeyFetch, k0: int, k1: int, k_multiple: int):
    """fetch() of keys [k0, k1) where k0 need not be a multiple of k_multiple."""
    a0 = k0 // k_multiple * k_multiple
    k, v = fetch(a0, k1)
    return k[k0 - a0:], v[k0 - a0:]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """One fused flash-attention call: q [n, Hq, D], k [t, Hk, D], v [t, Hk, Dv] ->
    (out [n, Hq, Dv] fp32, lse [n, Hq] fp32 natural log). causal: top-left (query i sees keys
    0..i). Without a mask the G = Hq / Hk query heads of a KV head fold into the query rows."""
    n, hq, d = q.shape
    t, hk, dv = v.shape
    group = hq // hk
    kf = upcast(k)
    shared = v.data_ptr() == k.data_ptr() and v.stride() == k.stride()  # MLA: v = k[..., :Dv]
    vf = kf if shared else upcast(v)
    width = max(d, vf.shape[2])
    qf = _pad(q.float(), width).reshape(n, hk, group, width)
    kf, vf = _pad(kf, width).permute(1, 0, 2), _pad(vf, width).permute(1, 0, 2)  # [Hk, t, W]
    if causal:  # [Hk, G, n, W] against keys broadcast over G (a stride-0 view)
        qq = qf.permute(1, 2, 0, 3)
        kk, vv = (x.unsqueeze(1).expand(hk, group, t, width) for x in (kf, vf))
    else:  # [Hk, 1, G * n, W], rows ordered (g, i)
        qq = qf.permute(1, 2, 0, 3).reshape(hk, 1, group * n, width)
        kk, vv = kf.unsqueeze(1), vf.unsqueeze(1)
    o, l = _SDPA_CPU(qq, kk, vv, 0.0, causal, scale=scale)[:2]
    o = o.reshape(hk, group, n, width)[..., :dv].permute(2, 0, 1, 3).reshape(n, hq, dv)
    return o, l.reshape(hk, group, n).permute(2, 0, 1).reshape(n, hq)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim to width (zeros change neither q . k nor the used value columns)."""
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _combine(acc, part):
    """LSE-merge of two attention results over disjoint keys (no -inf rows: see callers)."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse).unsqueeze(-1) + o2 * torch.exp(l2 - lse).unsqueeze(-1), lse


def _query_tile(q, q0, fetch, stop, scale, causal_offset, k_multiple, out, lse) -> None:
    """One query tile over key tiles [0, stop); writes out / lse (views) in place."""
    n, hq, d = q.shape
    state, qf = None, None
    step = _k_tile(hq, n, k_multiple)
    for k0 in range(0, stop, step):
        k1 = min(stop, k0 + step)
        k, v = fetch(k0, k1)
        kh = k.shape[1]
        if state is None:
            # Query head h reads KV head h // G: view q as [Hk, G, n, D] and batch over Hk.
            qf = (q.float() * scale).reshape(n, kh, hq // kh, d).permute(1, 2, 0, 3)
            state = _OnlineSoftmax((kh, hq // kh, n), v.shape[2], q.device)
        scores = torch.matmul(qf, upcast(k).permute(1, 2, 0).unsqueeze(1))  # [Hk, G, n, t]
        if causal_offset is not None and k1 - 1 > q0 + causal_offset:  # tile crosses the diagonal
            rows = torch.arange(q0, q0 + n, device=q.device)[:, None] + causal_offset
            cols = torch.arange(k0, k1, device=q.device)[None, :]
            scores.masked_fill_(cols > rows, float("-inf"))
        state.update(scores, upcast(v).permute(1, 0, 2).unsqueeze(1))  # values [Hk, 1, t, Dv]
    if state is not None:
        o, l = state.finish()  # [Hk, G, n, Dv], [Hk, G, n]
        out.copy_(o.permute(2, 0, 1, 3).reshape(n, hq, -1))
        lse.copy_(l.permute(2, 0, 1).reshape(n, hq))


def dense_fetch(k: torch.Tensor, v: torch.Tensor) -> KeyFetch:
    """Key tiles of dense k [L, Hk, D] / v [L, Hk, Dv] (views, no copy)."""
    return lambda k0, k1: (k[k0:k1], v[k0:k1])


def paged_fetch(k_pages: torch.Tensor, v_pages: torch.Tensor, pages: torch.Tensor,
                page_size: int) -> KeyFetch:
    """Key tiles of one request's local tokens from a paged cache.

    k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv]; pages [n_pages] the request's local
    page slots in order. Tiles must start at page boundaries (k_multiple = P).
    """
    def fetch(k0: int, k1: int):
        ids = pages[k0 // page_size: -(-k1 // page_size)].long()
        k = k_pages[ids].flatten(0, 1)[: k1 - k0]
        v = v_pages[ids].flatten(0, 1)[: k1 - k0]
        return k, v

    return fetch


def chunk_attention_torch(q, k, v, extend_lens, scale, *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Causal attention of each request's chunk over itself (contract of
    triton_extend.chunk_attention_triton): q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (any views,
    fp8 read with k_scale / v_scale), extend_lens host ints -> out [T, Hq, Dv] fp32, lse [T, Hq]."""
    def attend(_, rows):
        return tiled_attention_lse(q[rows], dense_fetch(k[rows], v[rows]), rows.stop - rows.start,
                                   v.shape[2], scale, causal_offset=0, k_scale=k_scale, v_scale=v_scale)

    return fill_by_request(q, v.shape[2], extend_lens, attend)


def prefix_attention_torch(q, k_pages, v_pages, page_table, extend_lens, local_prefix_lens, scale, *,
                           k_scale: float = 1.0, v_scale: float = 1.0):
    """Partial attention of each request's rows over its local prefix pages (contract of
    triton_extend.prefix_attention_triton); each page is read once per query tile."""
    page_size, dv = k_pages.shape[1], v_pages.shape[-1]

    def attend(i, rows):
        length = local_prefix_lens[i]
        if length == 0:
            return None
        fetch = paged_fetch(k_pages, v_pages, page_table[i], page_size)
        return tiled_attention_lse(q[rows], fetch, length, dv, scale, k_multiple=page_size,
                                   k_scale=k_scale, v_scale=v_scale)

    return fill_by_request(q, dv, extend_lens, attend)
