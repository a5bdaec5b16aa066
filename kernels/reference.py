"""fp32 torch references for Helix decode attention. Slow, simple, obviously right.

Every kernel in sglang_helix.kernels is tested against these. LSE is natural log (`lse`).
Paged layout: a request's local page i holds its local tokens [i*P, (i+1)*P); page_table[b, i]
is the physical page of that local page in the cache; seq_lens[b] is the local token count.
Caches may hold fp8 pages: the decode references dequantize each request's gathered tokens
(x.float() * k_scale / v_scale, kv_quant's convention) and attend those values.
"""

from __future__ import annotations

import torch

from .kv_quant import dequantize


def _gather_tokens(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens [0, length) of one request: cache [num_pages, P, ...] -> [length, ...]."""
    page_size = cache.shape[1]
    n = (length + page_size - 1) // page_size
    return cache[pages[:n].long()].reshape(n * page_size, *cache.shape[2:])[:length]


def gqa_partial_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial GQA/MHA decode attention over one rank's pages.

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv] (q's dtype
    or fp8 with per-tensor k_scale / v_scale); page_table: [B, max_pages] int; seq_lens: [B]
    int (may be 0). Query head h reads KV head h // (Hq // Kh).
    Returns out [B, Hq, Dv] fp32 (0 where seq_len == 0) and lse [B, Hq] fp32 (-inf there).
    """
    bsz, hq, _ = q.shape
    kh, dv = v_cache.shape[2], v_cache.shape[3]
    group = hq // kh
    out = torch.zeros(bsz, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((bsz, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(bsz):
        length = int(seq_lens[b])
        if length == 0:
            continue
        k = _gather_tokens(k_cache, page_table[b], length).float() * k_scale  # [L, Kh, D]
        v = _gather_tokens(v_cache, page_table[b], length).float() * v_scale  # [L, Kh, Dv]
        k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale  # [Hq, L]
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out, lse


def mla_partial_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial absorbed-MLA decode attention over one rank's pages.

    q_latent: [B, H, R] (q_nope already absorbed through W_UK); q_rope: [B, H, Dr];
    kv_cache: [num_pages, P, R + Dr] (latent c_kv then rotary k_pe, one shared head; fp8 pages
    dequantized with k_scale for the scores and v_scale for the values, as SGLang reads them);
    page_table: [B, max_pages]; seq_lens: [B].
    Returns out [B, H, R] fp32 in latent space (before W_UV) and lse [B, H] fp32.
    """
    rank_r = q_latent.shape[-1]
    bsz, heads, _ = q_latent.shape
    out = torch.zeros(bsz, heads, rank_r, dtype=torch.float32, device=q_latent.device)
    lse = torch.full((bsz, heads), float("-inf"), dtype=torch.float32, device=q_latent.device)
    for b in range(bsz):
        length = int(seq_lens[b])
        if length == 0:
            continue
        kv = _gather_tokens(kv_cache, page_table[b], length).float()  # [L, R + Dr]
        latent, rope = kv[:, :rank_r] * k_scale, kv[:, rank_r:] * k_scale
        scores = (q_latent[b].float() @ latent.T + q_rope[b].float() @ rope.T) * scale  # [H, L]
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.softmax(scores, dim=-1) @ (kv[:, :rank_r] * v_scale)
    return out, lse


def merge_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE-weighted merge of partial attention results.

    outs: [S, B, H, Dv] partial outputs (each normalised over its own shard);
    lses: [S, B, H] natural-log LSE of each partial (-inf for an empty shard).
    Returns out [B, H, Dv] fp32 and the merged lse [B, H] fp32. A row whose partials are all
    empty yields out 0 and lse -inf (never NaN).
    """
    lses = lses.float()
    total = torch.logsumexp(lses, dim=0)  # [B, H]
    safe_total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weights = torch.exp(lses - safe_total)  # exp(-inf) = 0 for empty shards
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out, total


def full_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Dense single-request attention, the ground truth for whole-sequence tests.

    q: [H, D]; k: [L, H, D]; v: [L, H, Dv] (KV heads already expanded). Returns ([H, Dv], [H]).
    """
    scores = torch.einsum("hd,lhd->hl", q.float(), k.float()) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v.float()), torch.logsumexp(scores, -1)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | None = None):
    """Dense attention of n queries over L keys with its LSE (fp32, natural log).

    q: [n, Hq, D]; k: [L, Hk, D]; v: [L, Hk, Dv] with Hq % Hk == 0 (query head h reads KV head
    h // (Hq / Hk)). causal_offset c: query i sees keys 0 .. i + c (None: every key).
    Returns out [n, Hq, Dv] fp32 (0 where a query sees no key) and lse [n, Hq] (-inf there).
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kf) * scale
    if causal_offset is not None:
        n, length = q.shape[0], k.shape[0]
        rows = torch.arange(n, device=q.device)[:, None] + causal_offset
        scores.masked_fill_(torch.arange(length, device=q.device)[None, :] > rows, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.einsum("hnl,lhd->nhd", torch.exp(scores - safe.unsqueeze(-1)), vf)
    return out, lse.transpose(0, 1).contiguous()


def chunk_attention_ref(q, k, v, extend_lens, scale, *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Causal attention of each request's chunk over itself (dequantized keys): q [T, Hq, D],
    k [T, Hk, D], v [T, Hk, Dv], extend_lens host ints -> out [T, Hq, Dv] fp32, lse [T, Hq]."""
    keys, values = dequantize(k, k_scale), dequantize(v, v_scale)
    return fill_by_request(q, v.shape[-1], extend_lens,
                           lambda _, rows: attention_lse_ref(q[rows], keys[rows], values[rows], scale, 0))


def prefix_attention_ref(q, k_pages, v_pages, page_table, extend_lens, local_prefix_lens, scale, *,
                         k_scale: float = 1.0, v_scale: float = 1.0):
    """Partial attention of each request's rows over its local prefix pages (page_table [B, pages]
    local slots; local_prefix_lens host ints): out [T, Hq, Dv] fp32 (0 without prefix), lse (-inf)."""
    def attend(i, rows):
        length = local_prefix_lens[i]
        if length == 0:
            return None
        keys = [dequantize(_gather_tokens(c, page_table[i], length), s)
                for c, s in ((k_pages, k_scale), (v_pages, v_scale))]
        return attention_lse_ref(q[rows], *keys, scale)

    return fill_by_request(q, v_pages.shape[-1], extend_lens, attend)


def fill_by_request(q: torch.Tensor, dv: int, extend_lens, attend):
    """out [T, Hq, Dv] fp32 (0) and lse [T, Hq] (-inf), filled request by request (the extend
    paths' loop): attend(i, rows) -> (out, lse) of request i's rows, or None to leave them empty."""
    out = torch.zeros(q.shape[0], q.shape[1], dv, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    start = 0
    for i, n in enumerate(extend_lens):
        rows = slice(start, start + n)
        start += n
        part = attend(i, rows) if n else None
        if part is not None:
            out[rows], lse[rows] = part
    return out, lse
