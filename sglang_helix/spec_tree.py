"""Speculative draft trees under KV sharding: pure index math and the tree verify's chunk attention.

Helix places the KV of a logical token loc on KVP rank `token_owner(loc)` (its page id's colour:
the colored allocator gives logical page j of a request a page id of colour j % KVP). A committed
prefix keeps position p at column p of the request's req_to_token row, so position-based page
tables work for it. Draft trees break "column = position" in three places, each handled here:

1. Tree verify (SGLang's EAGLE worker, top-k > 1): verify node i of a request sits at column
   seq_len + i but at position seq_len + depth(i). Every rank computes every node's K/V, so the
   verify is an extend over the KV-sharded prefix whose chunk attends under the tree mask
   (`tree_masks`, `tree_chunk_attention_lse`) instead of causally.
2. After verify, the accepted path's KV moves from column seq_len + i (node i) to column
   seq_len + d (its depth): `move_kv_cache(tgt, src)`. Source and target may lie on pages of
   different colours, i.e. different KVP ranks. The move is then: every rank reads the rows it
   owns among the sources (another rank's rows read as the padding page), one all-gather over the
   KVP group, and row i of the move is taken from rank `token_owner(src[i])`'s contribution
   (`moved_rows`); each rank writes the targets it owns. All sources are read before any target
   is written (SGLang's semantics). Exact: bytes are copied, nothing is computed.
3. Draft decode steps of a tree with page size > 1: SGLang lays branch t of a request with
   committed length L out page-aligned at column prefix_base + t * nnp * P (prefix_base = L // P *
   P, nnp = ceil((L % P + steps) / P)), the prefix's partial tail page duplicated into each
   branch's first page (a KV move, 2. above). Step s of branch t attends the virtual sequence of
   L + s + 1 tokens whose logical page j is column page j below prefix_base, j + t * nnp from
   there (`branch_page_columns`). The physical pages are then not coloured by virtual position,
   so each rank attends the virtual pages whose page id has its colour (`local_tables_by_color`):
   attention over a set of keys is the LSE merge of attention over any partition of it, and the
   colours partition the virtual sequence exactly (every page on one rank, once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sharding import token_owner


# ---------------------------------------------------------------- 2. cross-rank KV moves


def move_sources(src_loc: torch.Tensor, page_size: int, kvp: int) -> torch.Tensor:
    """[n] int64: the KVP rank holding each source loc's KV (its page colour)."""
    return token_owner(src_loc.to(torch.int64), page_size, kvp)


def moved_rows(gathered: torch.Tensor, src_owner: torch.Tensor) -> torch.Tensor:
    """gathered [KVP, n, ...] (rank r's reading of every source, its own rows right, others the
    padding page) -> [n, ...] the true source rows: row i from rank src_owner[i]."""
    if gathered.shape[1] != src_owner.shape[0]:
        raise ValueError(f"gathered {tuple(gathered.shape)} does not hold {src_owner.shape[0]} moves")
    return gathered[src_owner.to(torch.int64), torch.arange(src_owner.shape[0], device=gathered.device)]


# ---------------------------------------------------------------- 3. draft-tree decode tables


def branch_page_columns(seq_lens: torch.Tensor, topk: int, num_steps: int, step: int,
                        page_size: int, max_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft step `step` (0-based) of a top-k tree: the virtual page table of every branch.

    seq_lens [B] committed lengths. Returns (columns [B * topk, max_pages] int64: the column page
    (req_to_token column // P of its request's row) holding logical page j of branch
    b * topk + t's virtual sequence; lens [B * topk]: its length L + step + 1). Entries past a
    branch's pages repeat its first page (in range, never read). SGLang's layout (module doc);
    topk 1 is the chain: column page j for every j.
    """
    lens = seq_lens.to(torch.int64).repeat_interleave(topk)
    branch = torch.arange(topk, device=lens.device).repeat(seq_lens.shape[0])
    base_pages = lens // page_size
    nnp = (lens % page_size + num_steps + page_size - 1) // page_size
    j = torch.arange(max_pages, device=lens.device)[None, :]
    cols = torch.where(j < base_pages[:, None], j, j + (branch * nnp)[:, None])
    pages = (lens + step + 1 + page_size - 1) // page_size
    return torch.where(j < pages[:, None], cols, 0), lens + step + 1


def local_tables_by_color(page_ids: torch.Tensor, lens: torch.Tensor, rank: int, kvp: int,
                          page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of virtual sequences whose pages are any coloured page ids.

    page_ids [R, V] int64: colored page id of each row's logical (virtual) page j (entries past
    ceil(lens / P) ignored); lens [R] tokens (every virtual page full but the last). Returns
    (slots [R, V] int64: local slots (id // KVP) of the row's pages of colour `rank`, in virtual
    order, then 0; local_lens [R] int64: their tokens). With ids coloured by position (id % KVP ==
    j % KVP) this is the position-based table (sharding.local_page_table, local_seq_len).
    """
    rows, width = page_ids.shape
    lens = lens.to(torch.int64)
    vpages = (lens + page_size - 1) // page_size
    j = torch.arange(width, device=page_ids.device)[None, :].expand(rows, width)
    mine = (j < vpages[:, None]) & (page_ids % kvp == rank)
    order = torch.where(mine, j, j + width).argsort(dim=1)  # mine first, virtual order kept
    count = mine.sum(1)
    slots = torch.gather(page_ids // kvp, 1, order)
    slots = torch.where(j < count[:, None], slots, torch.zeros_like(slots))
    last = torch.gather(mine, 1, (vpages - 1).clamp(min=0)[:, None])[:, 0] & (vpages > 0)
    short = vpages * page_size - lens  # empty slots of the last virtual page
    return slots, count * page_size - torch.where(last, short, torch.zeros_like(short))


# ---------------------------------------------------------------- 1. tree verify


def tree_masks(custom_mask: torch.Tensor, seq_lens: Sequence[int], n: int) -> torch.Tensor:
    """[B, n, n] bool: verify node i attends node j (j is i or an ancestor of i), from SGLang's
    flat tree mask in either layout: QLEN_ONLY ([B, n, n] flat) or FULL_MASK (request b's n rows
    of seq_lens[b] + n columns, the prefix's columns first, requests back to back)."""
    flat = custom_mask.reshape(-1).to(torch.bool)
    bs = len(seq_lens)
    if flat.numel() == bs * n * n:
        return flat.view(bs, n, n)
    full = sum(n * (int(length) + n) for length in seq_lens)
    if flat.numel() != full:
        raise ValueError(f"tree mask of {flat.numel()} elements fits neither [B, n, n] = "
                         f"{bs * n * n} nor the full layout = {full} (B {bs}, n {n})")
    out, start = [], 0
    for length in seq_lens:
        rows = flat[start:start + n * (int(length) + n)].view(n, int(length) + n)
        out.append(rows[:, int(length):])
        start += n * (int(length) + n)
    return torch.stack(out) if out else flat.new_zeros(0, n, n)


def is_chain(masks: torch.Tensor) -> bool:
    """Every request's tree is the chain 0 -> 1 -> ... (its mask is lower triangular, full)."""
    n = masks.shape[-1]
    return bool((masks == torch.ones(n, n, dtype=torch.bool, device=masks.device).tril()).all())


def tree_chunk_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                             scale: float, *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Attention of each request's n verify queries over its n verify nodes under the tree mask.

    q [B * n, Hq, D], k [B * n, Hk, D], v [B * n, Hk, Dv] (Hq % Hk == 0; fp8 k / v read as
    x * k_scale, x * v_scale), masks [B, n, n] (every row marks at least the node itself).
    Returns out [B * n, Hq, Dv] fp32 and lse [B * n, Hq] fp32 natural log (dense fp32: n is the
    draft-token count, a handful).
    """
    bs, n = masks.shape[0], masks.shape[-1]
    if q.shape[0] != bs * n or k.shape[0] != bs * n or q.shape[1] % k.shape[1]:
        raise ValueError(f"tree attention needs q, k, v of B * n = {bs * n} rows and Hq % Hk == 0; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    group = q.shape[1] // k.shape[1]
    qf = q.float().view(bs, n, q.shape[1], -1)
    kf = (k.float() * k_scale).repeat_interleave(group, 1).view(bs, n, q.shape[1], -1)
    vf = (v.float() * v_scale).repeat_interleave(group, 1).view(bs, n, q.shape[1], -1)
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    scores = scores.masked_fill(~masks.to(torch.bool)[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, n]
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(scores - lse[..., None]), vf)
    return out.reshape(bs * n, q.shape[1], -1), lse.transpose(1, 2).reshape(bs * n, q.shape[1])
