"""Pure index math for Helix KV sharding. No torch.distributed in here.

Logical page j of a request (tokens [j*P, (j+1)*P)) is owned by KVP rank j % KVP and sits at
local page j // KVP of that rank's shard. Ownership is a function of the position only, so two
requests sharing a prefix share ownership of the prefix pages on every rank.

Every function accepts Python ints or integer tensors (element-wise) unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

IntLike = TypeVar("IntLike", int, torch.Tensor)


def _check_kvp_page(page_size: int, kvp: int) -> None:
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if kvp < 1:
        raise ValueError(f"kvp must be >= 1, got {kvp}")


def _check_rank(rank: int, kvp: int) -> None:
    if not 0 <= rank < kvp:
        raise ValueError(f"kvp rank {rank} outside [0, {kvp})")


def page_owner(page: IntLike, kvp: int) -> IntLike:
    """KVP rank owning logical page `page`."""
    _check_kvp_page(1, kvp)
    return page % kvp


def token_owner(pos: IntLike, page_size: int, kvp: int) -> IntLike:
    """KVP rank owning the token at position `pos` (0-based)."""
    _check_kvp_page(page_size, kvp)
    return (pos // page_size) % kvp


def append_owner(seq_len: IntLike, page_size: int, kvp: int) -> IntLike:
    """KVP rank that stores the next decode token of a sequence of `seq_len` tokens.

    Staggered append: the owner rotates every `page_size` tokens.
    """
    return token_owner(seq_len, page_size, kvp)


def local_token_index(pos: IntLike, page_size: int, kvp: int) -> IntLike:
    """Position of token `pos` inside its owner's shard (shard tokens are page-contiguous)."""
    _check_kvp_page(page_size, kvp)
    return (pos // page_size // kvp) * page_size + pos % page_size


def local_seq_len(seq_len: IntLike, rank: int, page_size: int, kvp: int) -> IntLike:
    """Tokens of positions [0, seq_len) that KVP rank `rank` holds.

    Sequences shorter than KVP x P leave the later ranks with 0 tokens.
    """
    _check_kvp_page(page_size, kvp)
    _check_rank(rank, kvp)
    full_pages = seq_len // page_size
    tail = seq_len % page_size
    # full pages j < full_pages with j % kvp == rank, counted without a loop
    owned_full = (full_pages + (kvp - 1 - rank)) // kvp
    tail_here = (full_pages % kvp) == rank
    if isinstance(seq_len, torch.Tensor):
        return owned_full * page_size + torch.where(tail_here, tail, torch.zeros_like(tail))
    return owned_full * page_size + (tail if tail_here else 0)


def local_seq_lens_all(seq_lens: torch.Tensor, page_size: int, kvp: int) -> torch.Tensor:
    """Per-rank KV lengths for a ragged batch.

    seq_lens: [B] integer tensor of logical lengths.
    Returns [KVP, B] (same dtype); column sums equal seq_lens.
    """
    return torch.stack([local_seq_len(seq_lens, r, page_size, kvp) for r in range(kvp)])


def num_pages(seq_len: IntLike, page_size: int) -> IntLike:
    """Logical pages needed for `seq_len` tokens (ceil division)."""
    _check_kvp_page(page_size, 1)
    return (seq_len + page_size - 1) // page_size


def local_num_pages(seq_len: IntLike, rank: int, page_size: int, kvp: int) -> IntLike:
    """Pages of a `seq_len`-token sequence that KVP rank `rank` holds (partial tail page counts)."""
    return num_pages(local_seq_len(seq_len, rank, page_size, kvp), page_size)


def local_page_table(page_table: torch.Tensor, rank: int, kvp: int) -> torch.Tensor:
    """A rank's page table: the logical page columns it owns.

    page_table: [B, max_pages] — entry [b, j] identifies the storage of logical page j of request
        b (any id; -1 or garbage past the end is carried along untouched).
    Returns [B, ceil((max_pages - rank) / kvp)] view-free copy of columns rank, rank + kvp, ...
    Entry [b, i] is logical page i * kvp + rank, i.e. local page i of that rank.
    """
    _check_kvp_page(1, kvp)
    _check_rank(rank, kvp)
    if page_table.dim() != 2:
        raise ValueError(f"page_table must be [B, max_pages], got shape {tuple(page_table.shape)}")
    return page_table[:, rank::kvp].contiguous()


def colored_page_id_to_slot(page_id: IntLike, kvp: int) -> IntLike:
    """Slot in a rank's pool of a page id from a KVP-colored allocator.

    A colored allocator hands logical page j of any request an id with id % KVP == j % KVP, so
    each rank stores only ids of its own color, at slot id // KVP: its pool is 1/KVP of the
    logical capacity.
    """
    return page_id // kvp


# Slot 0 of every Helix pool is the padding page: a write sink, never a real page (colored ids
# start at KVP, so id // KVP >= 1). Transferred pages another KVP rank stores point there.
SINK_SLOT = 0


def transfer_page_slots(page_ids: torch.Tensor, rank: int, kvp: int) -> torch.Tensor:
    """Destination slots of one decode KVP rank for a prefill->decode KV transfer.

    page_ids: [n] colored page ids the decode server allocated for the transferred pages (in
    logical order; each >= kvp). Returns [n] int64: colored_page_id_to_slot(id) where
    id % kvp == rank, else SINK_SLOT. A Helix-aware prefill skips the SINK_SLOT pairs, so each
    decode rank receives exactly the pages it stores; a prefill without the plugin writes them
    into the sink page instead (correct, without the 1/KVP saving), never out of bounds.
    """
    _check_kvp_page(1, kvp)
    _check_rank(rank, kvp)
    ids = torch.as_tensor(page_ids).to(torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"page_ids must be [n], got shape {tuple(ids.shape)}")
    if bool((ids < kvp).any()):
        raise ValueError(f"page_ids must be colored page ids (>= kvp={kvp}); got "
                         f"{ids[ids < kvp].tolist()[:4]}")
    owned = page_owner(ids, kvp) == rank
    return torch.where(owned, colored_page_id_to_slot(ids, kvp), torch.full_like(ids, SINK_SLOT))


def owned_transfer_pairs(src_pages: torch.Tensor, dst_slots: torch.Tensor):
    """Keep the (source page, destination slot) pairs whose destination is a real slot.

    src_pages, dst_slots: [n] (dst_slots from transfer_page_slots). Returns (src [m], dst [m])
    with m = number of entries of dst_slots that are not SINK_SLOT, order kept.
    """
    src = torch.as_tensor(src_pages)
    dst = torch.as_tensor(dst_slots)
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src_pages {tuple(src.shape)} and dst_slots {tuple(dst.shape)} must be "
                         "equal-length [n]")
    keep = dst != SINK_SLOT
    return src[keep], dst[keep]


def shard_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range [0, total) into `parts` contiguous near-equal pieces (sizes differ by <= 1).

    Used for HOP-B batch slices. Pieces may be empty when parts > total.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# ----------------------------------------------------------------------------- pool sizing and new pages


def pages_per_color(size: int, page_size: int, kvp: int) -> int:
    """Allocatable pages of each color for a logical capacity of `size` tokens.

    Logical pages are size // P (SGLang's paged allocator floors too); each color gets
    floor(pages / KVP) of them, so KVP x pages_per_color <= the Helix-off page count.
    """
    if page_size < 1 or kvp < 1:
        raise ValueError(f"page_size={page_size} and kvp={kvp} must be >= 1")
    return (size // page_size) // kvp


def local_pool_tokens(size: int, page_size: int, kvp: int) -> int:
    """Token rows a rank's pool holds, excluding the padding page (SGLang adds that page)."""
    return pages_per_color(size, page_size, kvp) * page_size


def helix_logical_tokens(
    stock_tokens: int, stock_bytes_per_token: int, helix_bytes_per_token: int, page_size: int, kvp: int
) -> int:
    """Logical capacity of a Helix pool using the per-rank bytes SGLang budgeted for its own pool.

    stock_tokens: SGLang's per-rank rows (its memory profile); *_bytes_per_token: per-rank bytes
    of one token row (stock: K/N or replicated heads, or the latent; Helix: K/TPA heads or the
    latent). Returns a multiple of KVP x P.
    """
    budget = (stock_tokens + page_size) * stock_bytes_per_token
    local_pages = budget // (helix_bytes_per_token * page_size) - 1  # minus the padding page
    return max(local_pages, 0) * kvp * page_size


def new_page_indices(prefix: Sequence[int], seq: Sequence[int], page_size: int):
    """Logical page index of every new page of a batch, in batch order.

    prefix, seq: host ints per request. Request i needs pages ceil(prefix/P) .. ceil(seq/P)-1.
    Returns (page_index [n] int64, first_new [B], count [B]).
    """
    first = [-(-p // page_size) for p in prefix]
    count = [max(-(-s // page_size) - f, 0) for s, f in zip(seq, first)]
    parts = [torch.arange(f, f + n, dtype=torch.int64) for f, n in zip(first, count)]
    index = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return index, first, count


def color_counts(page_index: torch.Tensor, kvp: int) -> list[int]:
    return torch.bincount(page_owner(page_index, kvp), minlength=kvp).tolist()


# ---- speculative verify (KV moves) -----------------------------------------------------


def kv_move_is_local(tgt_loc: torch.Tensor, src_loc: torch.Tensor, page_size: int,
                     kvp: int) -> torch.Tensor:
    """[n] bool: the KV move src_loc[i] -> tgt_loc[i] stays on one KVP rank (same page color).

    Moves between ranks would need a collective; chain drafts never make one (an accepted draft
    already sits at its own position, tgt == src).
    """
    # a colored allocator's logical loc has its page id's color, i.e. token_owner of the loc
    return token_owner(tgt_loc.to(torch.int64), page_size, kvp) == token_owner(src_loc.to(torch.int64),
                                                                               page_size, kvp)


# ---- HiCache host tier: host page ids colored like device page ids ---------------------
# A host page id h has color h % KVP and sits at local host slot h // KVP of rank h % KVP, as a
# device page id does in the device pool (ids < KVP: every rank's padding slot 0). A device page
# of color c backs up into a host page of color c and loads back into a device page of color c,
# so each KVP rank copies only its own pages, and the ids (the radix tree's host values) are the
# same on every rank.


def page_ids_of_locs(locs: torch.Tensor, page_size: int) -> torch.Tensor:
    """Page ids of a run of whole pages: locs [n] (n a multiple of P, each page's P locs in a row)
    -> [n // P] int64, the id of each page once."""
    _check_kvp_page(page_size, 1)
    locs = torch.as_tensor(locs).to(torch.int64)
    if locs.dim() != 1 or locs.numel() % page_size:
        raise ValueError(f"locs must be [n] whole pages of {page_size} tokens, got shape "
                         f"{tuple(locs.shape)}")
    return locs[::page_size] // page_size


def locs_of_page_ids(page_ids: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token locs of whole pages: page ids [m] -> [m * P] int64 (page i's locs i*P .. i*P+P-1)."""
    _check_kvp_page(page_size, 1)
    ids = torch.as_tensor(page_ids).to(torch.int64).reshape(-1, 1)
    return (ids * page_size + torch.arange(page_size, dtype=torch.int64, device=ids.device)).flatten()


def owned_local_rows(locs: torch.Tensor, rank: int, page_size: int, kvp: int):
    """The locs [n] of colored pages (device or host ids) that KVP rank `rank` stores, as rows of
    its local pool: (owned [n] bool, rows [owned.sum()] int64 in order: slot * P + offset)."""
    _check_kvp_page(page_size, kvp)
    _check_rank(rank, kvp)
    locs = torch.as_tensor(locs).to(torch.int64)
    owned = token_owner(locs, page_size, kvp) == rank
    return owned, local_token_index(locs[owned], page_size, kvp)


def cyclic_colors(first_page: int, pages: int, kvp: int) -> torch.Tensor:
    """Colors of `pages` consecutive logical pages starting at logical page `first_page`:
    [pages] int64, (first_page + i) % KVP."""
    _check_kvp_page(1, kvp)
    if pages < 0 or first_page < 0:
        raise ValueError(f"first_page={first_page} and pages={pages} must be >= 0")
    return page_owner(torch.arange(first_page, first_page + pages, dtype=torch.int64), kvp)
