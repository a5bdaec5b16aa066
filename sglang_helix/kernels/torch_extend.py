"""Tiled torch attention with LSE for extend (prefill) queries: the CPU production path.

One algorithm serves both halves of a Helix extend, for GQA and absorbed MLA alike:
- the chunk's causal self-attention (keys = the chunk's own new K/V, dense), and
- the partial over this rank's pages of a cached prefix (keys gathered page by page).
Queries are walked in tiles and keys in tiles with an online softmax, so nothing of size
n x n (or n x prefix) is materialised and each prefix page is read once per query tile.
Accumulation is fp32; out comes back fp32, lse natural log fp32 (-inf where a query sees no key).
Keys may be fp8 pages (kv_quant): each fetched tile is upcast on its own, k_scale folded into the
query scale and v_scale into the output; no pool is dequantized.
Contract and ground truth: reference.attention_lse_ref.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kv_quant import upcast
from .torch_decode import _OnlineSoftmax

# fp32 elements of one scores tile [Hq, q_tile, k_tile]: ~16 MB, unless _MIN_K_TILE keys x Hq x
# q_tile is more (many heads: then a tile is _MIN_K_TILE keys wide).
_TILE_ELEMS = 4 * 1024 * 1024
_Q_TILE = 512
_MIN_K_TILE = 256

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
    causal_offset c: query i sees keys 0 .. i + c (None: all keys). k_multiple: key tiles start
    at multiples of it (the page size, so a paged fetch gathers whole pages).
    Returns out [n, Hq, Dv] fp32 (0 where a query sees no key) and lse [n, Hq] fp32 (-inf there).
    """
    n, hq, _ = q.shape
    out = torch.zeros(n, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for q0 in range(0, n, _Q_TILE):
        q1 = min(n, q0 + _Q_TILE)
        stop = length if causal_offset is None else min(length, q1 + causal_offset)
        _query_tile(q[q0:q1], q0, fetch, stop, scale * k_scale, causal_offset, k_multiple,
                    out[q0:q1], lse[q0:q1])
    if v_scale != 1.0:
        out.mul_(v_scale)
    return out, lse


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
