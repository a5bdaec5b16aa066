"""Helix KV memory inside SGLang 0.5.23: a KVP-colored page allocator and rank-local KV pools.

Ownership (docs/math.md §1): logical page j of a request lives on KVP rank j % KVP. SGLang's
radix cache, req_to_token and scheduler only ever see *page ids* (loc // P), identical on every
rank, so the allocator encodes ownership in the id itself:

    color(page id p)       = p % KVP          (layout.page_owner)
    local slot on its owner = p // KVP         (layout.colored_page_id_to_slot)
    local row of loc        = slot * P + loc % P

`HelixPagedAllocator` hands logical page j of any request an id of color j % KVP, from KVP
per-color free lists that evolve identically on every rank (SPMD: the same scheduler stream, no
communication). Ids 0 .. KVP-1 are reserved: they map to local slot 0 of each rank, the padding
page SGLang writes dummy tokens into. Because a cached prefix page keeps its id, and its position
in any request that matches it is the same, prefix hits stay page-granular (P tokens).

`HelixMHATokenToKVPool` / `HelixMLATokenToKVPool` hold only this rank's color: (pages/KVP + 1)
pages of K/TPA heads (GQA) or of the latent (MLA). Writes arrive with *logical* locs; rows owned
by other KVP ranks are redirected to the padding page (dropped, sync-free, fixed shapes).

`install_pool_hooks()` wires both into SGLang's KVCacheConfigurator; a no-op unless the
ServerArgs carries a `_helix_layout` (HelixConfig).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch

from .config import HelixConfig
from .hooks import missing_hooks, register_once
from .layout import colored_page_id_to_slot, local_page_table, local_seq_len, page_owner

logger = logging.getLogger(__name__)

CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
POOL_TARGET = f"{CONFIGURATOR}._build_token_to_kv_pool"
ALLOCATOR_TARGET = f"{CONFIGURATOR}._build_token_to_kv_pool_allocator"
CAPACITY_TARGET = f"{CONFIGURATOR}.logical_token_capacity"
LEAK_CHECK_TARGET = ("sglang.srt.managers.scheduler_components.invariant_checker."
                     "SchedulerInvariantChecker._check_full_pool")
LAYOUT_ATTR = "_helix_layout"


class HelixPoolError(RuntimeError):
    """A Helix pool/allocator request SGLang's path cannot satisfy; the message names the fix."""


# ----------------------------------------------------------------------------- sizing (pure)


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


# ----------------------------------------------------------------------------- allocator


def _paged_base():
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    return PagedTokenToKVPoolAllocator


class _ColoredFreeLists:
    """KVP free lists of page ids (list c holds ids with id % KVP == c), plus staged frees."""

    def __init__(self, kvp: int, per_color: int, device):
        self.kvp, self.device = kvp, device
        ids = torch.arange(1, per_color + 1, dtype=torch.int64, device=device) * kvp
        self.free = [ids + c for c in range(kvp)]
        self.staged: list[list[torch.Tensor]] = [[] for _ in range(kvp)]

    def counts(self) -> list[int]:
        """Free pages per color (ready + staged)."""
        return [len(f) + sum(len(s) for s in st) for f, st in zip(self.free, self.staged)]

    def merge(self, color: int) -> None:
        if self.staged[color]:
            self.free[color], _ = torch.sort(torch.cat([self.free[color], *self.staged[color]]))
            self.staged[color] = []

    def pop(self, color: int, n: int) -> torch.Tensor:
        if n > len(self.free[color]):
            self.merge(color)
        out, self.free[color] = self.free[color][:n], self.free[color][n:]
        return out

    def release(self, page_ids: torch.Tensor, staged: bool) -> None:
        """Return ids to their colors (page_ids [n] int64, unique)."""
        colors = page_owner(page_ids, self.kvp)
        for c in range(self.kvp):
            ids = page_ids[colors == c]
            if ids.numel() == 0:
                continue
            if staged:
                self.staged[c].append(ids)
            else:
                self.free[c] = torch.cat((ids, self.free[c]))

    def all_ids(self) -> torch.Tensor:
        return torch.cat([t for c in range(self.kvp) for t in (self.free[c], *self.staged[c])])


def _new_page_plan(prefix: Sequence[int], seq: Sequence[int], page_size: int):
    """Logical page index of every new page of a batch, in batch order.

    prefix, seq: host ints per request. Request i needs pages ceil(prefix/P) .. ceil(seq/P)-1.
    Returns (page_index [n] int64, first_new [B], count [B]).
    """
    first = [-(-p // page_size) for p in prefix]
    count = [max(-(-s // page_size) - f, 0) for s, f in zip(seq, first)]
    parts = [torch.arange(f, f + n, dtype=torch.int64) for f, n in zip(first, count)]
    index = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return index, first, count


def _color_counts(page_index: torch.Tensor, kvp: int) -> list[int]:
    return torch.bincount(page_owner(page_index, kvp), minlength=kvp).tolist()


class HelixPagedAllocator(_paged_base()):
    """SGLang paged allocator whose page ids carry their KVP owner as a color.

    size: logical token capacity (what the scheduler may hold across all KVP ranks);
    page_size: SGLang's page size P (>= 2: SGLang's page-size-1 path allocates without
        positions); kvp: KVP ranks. Allocatable ids: c + KVP*k, k = 1..pages_per_color.

    Interface of SGLang 0.5.23's PagedTokenToKVPoolAllocator: alloc_extend, alloc_decode, free,
    free_segment(s), free_page_ids, free_group_begin/end, merge_and_sort_free, available_size,
    get_all_free_pages, clear, resize; plus the scheduler capacity hooks
    get_extend_allocation_demand, evict_to_free_tokens and check_decode_capacity, made
    color-exact. Position-less `alloc(n)` is refused (use alloc_at).
    """

    def __init__(self, size: int, page_size: int, dtype, device, kvcache, need_sort: bool, *, kvp: int):
        if page_size < 2:
            raise HelixPoolError(
                f"Helix needs --page-size >= 2 (got {page_size}): SGLang allocates page-size-1 KV "
                f"slots without their positions, so KVP ownership cannot be assigned; use e.g. "
                f"--page-size 16"
            )
        if kvp < 1:
            raise HelixPoolError(f"kvp must be >= 1, got {kvp}")
        self.kvp = kvp
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)

    # ---- state ----------------------------------------------------------------

    def clear(self):
        """Fresh per-color lists (ids < KVP reserved as every rank's padding slot 0)."""
        self.per_color = pages_per_color(self.size, self.page_size, self.kvp)
        self.colors = _ColoredFreeLists(self.kvp, self.per_color, self.device)
        self.free_group = None
        self.free_page_ids_group = []
        self.staged_pages = []
        self.num_staged_pages = 0
        self.free_pages = None  # the flat list is unused; fail loud on stale readers
        self.release_pages = None

    def resize(self, config) -> None:
        self.size = config.max_total_num_tokens
        self.num_pages = self.size // self.page_size
        self.clear()

    def color_free_counts(self) -> list[int]:
        """Free pages per color (identical on every rank)."""
        return self.colors.counts()

    def available_size(self) -> int:
        """Logical tokens surely allocatable: KVP x (fullest-constrained color) x P."""
        return self.kvp * min(self.colors.counts()) * self.page_size

    def aggregate_free_size(self) -> int:
        """All free logical token slots (not an admission gate)."""
        return sum(self.colors.counts()) * self.page_size

    def get_all_free_pages(self) -> torch.Tensor:
        return self.colors.all_ids()

    def merge_and_sort_free(self):
        for c in range(self.kvp):
            self.colors.merge(c)

    def _release_page_ids(self, *page_ids: torch.Tensor):
        """Every free path of the paged base (free, free_segment, free_page_ids, groups) lands
        here: ids go back to their color."""
        for ids in page_ids:
            self.colors.release(ids.to(torch.int64).flatten(), staged=self.need_sort)

    def _debug_check_no_duplicate_pages(self):
        ids = self.get_all_free_pages()
        assert len(torch.unique(ids)) == len(ids), "double free: duplicate page ids"

    # ---- allocation -------------------------------------------------------------

    def alloc(self, need_size: int):
        raise HelixPoolError(
            "HelixPagedAllocator.alloc(n) has no token positions, so it cannot color pages by "
            "KVP owner. It is reached from SGLang's page-size-1 path, HiCache load-back and PD "
            "decode; use --page-size >= 2 and drop --enable-hierarchical-cache / PD for Helix "
            "(position-aware callers: alloc_at)."
        )

    def alloc_at(self, start_pos: int, need_size: int) -> Optional[torch.Tensor]:
        """Whole pages for positions [start_pos, start_pos + need_size) of one request.

        start_pos and need_size page-aligned. Returns [need_size] int64 locs or None if a color
        is short (nothing popped then).
        """
        if start_pos % self.page_size or need_size % self.page_size:
            raise ValueError(f"alloc_at needs page-aligned start_pos={start_pos} and "
                             f"need_size={need_size} (page_size={self.page_size})")
        lens = torch.tensor([start_pos, start_pos + need_size], dtype=torch.int64)
        return self.alloc_extend(lens[:1], lens[:1], lens[1:], lens[1:],
                                 torch.tensor([-1], dtype=torch.int64), need_size)

    def _pop_pages(self, page_index: torch.Tensor) -> Optional[torch.Tensor]:
        """Page ids for logical page indices [n] (batch order): color j % KVP each, or None."""
        need = _color_counts(page_index, self.kvp)
        if any(n > have for n, have in zip(need, self.colors.counts())):
            return None
        ids = torch.empty(page_index.numel(), dtype=torch.int64, device=self.device)
        colors = page_owner(page_index, self.kvp)
        for c, n in enumerate(need):
            if n:
                ids[(colors == c).nonzero().flatten().to(self.device)] = self.colors.pop(c, n)
        return ids

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: Optional[int] = None,
        **unused: Any,
    ) -> Optional[torch.Tensor]:
        """Locs for positions prefix_lens[i] .. seq_lens[i]-1 of each request, batch order.

        prefix_lens/seq_lens [B] (device + host copies); last_loc [B] loc of position
        prefix-1 (-1 if none). Tokens completing a partly filled prefix page continue it
        (last_loc + 1, ...); each new logical page j gets an id of color j % KVP.
        Returns [extend_num_tokens] int64 or None (out of pages of some color; nothing taken).
        """
        prefix = [int(x) for x in prefix_lens_cpu.tolist()]
        seq = [int(x) for x in seq_lens_cpu.tolist()]
        if sum(s - p for s, p in zip(seq, prefix)) != extend_num_tokens:
            raise ValueError(f"extend_num_tokens={extend_num_tokens} != sum(seq - prefix)")
        page_index, first, count = _new_page_plan(prefix, seq, self.page_size)
        ids = self._pop_pages(page_index)
        if ids is None:
            return None
        return self._extend_locs(prefix, seq, first, count, ids, last_loc)

    def _extend_locs(self, prefix, seq, first, count, ids, last_loc) -> torch.Tensor:
        ps, parts, start = self.page_size, [], 0
        for i, (p, s) in enumerate(zip(prefix, seq)):
            boundary = min(first[i] * ps, s)
            if boundary > p:  # finish the partly filled last prefix page
                parts.append(last_loc[i : i + 1].to(torch.int64) + 1
                             + torch.arange(boundary - p, dtype=torch.int64, device=self.device))
            if s > boundary:
                pos = torch.arange(boundary, s, dtype=torch.int64, device=self.device)
                page_ids = ids[start : start + count[i]]
                parts.append(page_ids[pos // ps - first[i]] * ps + pos % ps)
            start += count[i]
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat(parts)

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor, **unused: Any
    ) -> Optional[torch.Tensor]:
        """One loc per request for position seq_lens-1 (seq_lens already counts the new token).

        last_loc [B]: loc of position seq_lens-2. A token opening logical page j = (seq-1)//P
        gets a fresh id of color j % KVP (staggered append); others continue their page.
        Returns [B] int64 or None (nothing taken).
        """
        pos = seq_lens_cpu.to(torch.int64) - 1
        opens = pos % self.page_size == 0
        ids = self._pop_pages(pos[opens] // self.page_size)
        if ids is None:
            return None
        out = last_loc.to(torch.int64) + 1
        if ids.numel():
            rows = opens.nonzero().flatten().to(self.device)
            out[rows] = ids * self.page_size
        return out

    # ---- scheduler capacity hooks (color-exact) --------------------------------

    def tokens_for_pages(self, page_index: torch.Tensor) -> int:
        """Logical tokens available_size() must report for these new logical pages to fit."""
        if page_index.numel() == 0:
            return 0
        return self.kvp * max(_color_counts(page_index, self.kvp)) * self.page_size

    def get_extend_allocation_demand(self, prefix_lens_cpu, seq_lens_cpu, *, conservative_num_tokens,
                                     shard_size):
        page_index, _, _ = _new_page_plan(prefix_lens_cpu.tolist(), seq_lens_cpu.tolist(), self.page_size)
        return max(conservative_num_tokens, self.tokens_for_pages(page_index))

    def evict_to_free_tokens(self, tree_cache, num_tokens: int):
        """Evict until available_size() >= num_tokens; loops because an eviction spreads over
        colors (mirrored on every rank: deterministic)."""
        if tree_cache is None or not tree_cache.supports_prefix_sharing():
            return None
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        while self.available_size() < num_tokens:
            shortfall = num_tokens - self.available_size()
            result = tree_cache.evict(EvictParams(num_tokens=max(shortfall, self.page_size)))
            if result.num_tokens_evicted == 0:
                break
        return None

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None):
        """As SGLang's, with the demand raised to the color-exact one of the next decode step
        (request r opens logical page kv_committed_len // P when kv_committed_len % P == 0)."""
        demand = num_tokens
        if requests is not None and (spec_algorithm is None or spec_algorithm.is_none()):
            lens = torch.tensor([r.kv.kv_committed_len for r in requests], dtype=torch.int64)
            demand = max(demand, self.tokens_for_pages(lens[lens % self.page_size == 0] // self.page_size))
        elif requests is not None:
            demand = max(demand, num_tokens * self.kvp)  # speculative: colors unknown, be safe
        self.evict_to_free_tokens(tree_cache, demand)
        return self.available_size() >= demand


# ----------------------------------------------------------------------------- pools


class _HelixPoolMixin:
    """Logical loc -> this rank's row. Set up by _init_helix(kvp, kvp_rank, logical_size)."""

    def _init_helix(self, kvp: int, kvp_rank: int, logical_size: int) -> None:
        if not 0 <= kvp_rank < kvp:
            raise HelixPoolError(f"kvp_rank={kvp_rank} outside [0, kvp={kvp})")
        self.kvp, self.kvp_rank, self.logical_size = kvp, kvp_rank, logical_size
        self.per_color = pages_per_color(logical_size, self.page_size, kvp)

    def local_rows(self, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc [n] logical token locs -> (rows [n] int64 local rows, owned [n] bool).

        Rows of locs another KVP rank owns point into the padding page (rows 0..P-1), so a
        scatter through them drops those tokens without a host sync.
        """
        loc = loc.to(torch.int64)
        page = loc // self.page_size
        offset = loc % self.page_size
        owned = page_owner(page, self.kvp) == self.kvp_rank
        rows = colored_page_id_to_slot(page, self.kvp) * self.page_size + offset
        return torch.where(owned, rows, offset), owned

    def local_slots(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Page ids of this rank's color -> local page slots (same shape)."""
        return colored_page_id_to_slot(page_ids, self.kvp)

    def local_decode_tables(self, req_to_token: torch.Tensor, seq_lens: torch.Tensor,
                            max_pages: Optional[int] = None):
        """Attention inputs of this rank for a batch.

        req_to_token: [B, >= max_seq] logical locs (rows of SGLang's req_to_token for the
        batch); seq_lens: [B] logical lengths. Returns (page_table [B, ceil((pages - r)/KVP)]
        int32 local slots, local_lens [B] int32) for sglang_helix.attention (entries past a
        request's local pages are garbage-but-in-range).
        """
        pages = max_pages if max_pages is not None else -(-int(seq_lens.max()) // self.page_size)
        first_locs = req_to_token[:, : pages * self.page_size : self.page_size].to(torch.int64)
        logical = first_locs // self.page_size  # [B, pages] page id of logical page j
        table = self.local_slots(local_page_table(logical, self.kvp_rank, self.kvp))
        table = table.clamp_(0, self.per_color)  # stale ids past a request's end stay in range
        lens = local_seq_len(seq_lens.to(torch.int64), self.kvp_rank, self.page_size, self.kvp)
        return table.to(torch.int32), lens.to(torch.int32)

    def _refuse(self, what: str, fix: str):
        raise HelixPoolError(f"{type(self).__name__}.{what} is not supported under Helix: {fix}")

    def move_kv_cache(self, tgt_loc, src_loc):
        self._refuse("move_kv_cache", "drop speculative decoding (--speculative-algorithm)")

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        self._refuse("get_cpu_copy", "drop --enable-hierarchical-cache / request offload")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        self._refuse("load_cpu_copy", "drop --enable-hierarchical-cache / request offload")


def _mha_base():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool


def _mla_base():
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    return MLATokenToKVPool


class HelixMHATokenToKVPool(_HelixPoolMixin, _mha_base()):
    """GQA pool of one Helix rank: K/TPA KV heads, pages of its KVP color only.

    size: logical token capacity (same number the allocator gets); head_num: KV heads this
    rank stores (K/TPA); kvp, kvp_rank: its KVP shard. Buffers k_buffer/v_buffer[layer] are
    [(pages_per_color + 1) * P, K/TPA, D]; row r*P.. of slot 0 is padding.
    """

    def __init__(self, size: int, page_size: int, *args, kvp: int, kvp_rank: int, **kwargs):
        if kwargs.get("quant_method") is not None or kwargs.get("post_capture_active"):
            raise HelixPoolError("Helix pools support plain KV dtypes only; drop FP4/MXFP8 KV "
                                 "cache and post-capture KV resizing")
        super().__init__(local_pool_tokens(size, page_size, kvp), page_size, *args, **kwargs)
        if self.kv_cache_layout != "nhd":
            raise HelixPoolError(f"Helix pools need the NHD KV layout, got {self.kv_cache_layout}; "
                                 f"unset SGLANG_USE_HND_KVCACHE / SGLANG_AITER_KV_CACHE_LAYOUT")
        self._init_helix(kvp, kvp_rank, size)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        """cache_k [n, K/TPA, D], cache_v [n, K/TPA, Dv] for logical locs [n]; stores owned
        rows only (others land in the padding page)."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        if dcp_kv_mask is not None:
            raise HelixPoolError("dcp_kv_mask reached a Helix pool: drop --dcp-size with --enable-helix")
        loc, _, _ = unwrap_write_loc(loc_info)
        rows, _ = self.local_rows(loc)
        super().set_kv_buffer(layer, rows, cache_k, cache_v, k_scale, v_scale, layer_id_override)

    def get_paged_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [slots, P, K/TPA, D], v [slots, P, K/TPA, Dv]) views for paged partial attention."""
        k, v = self.get_kv_buffer(layer_id)
        return (k.view(-1, self.page_size, *k.shape[1:]), v.view(-1, self.page_size, *v.shape[1:]))


class HelixMLATokenToKVPool(_HelixPoolMixin, _mla_base()):
    """Absorbed-MLA latent pool of one KVP rank: [(pages_per_color + 1) * P, 1, R + Dr] per
    layer. Every rank computes the latent of every new token; only the owner keeps it."""

    write_loc_is_dcp_resolved = True  # locs are turned into local rows here, never DCP-widened

    def __init__(self, size: int, page_size: int, *args, kvp: int, kvp_rank: int, **kwargs):
        if kwargs.get("use_dsa") or kwargs.get("override_kv_cache_dim") is not None:
            raise HelixPoolError("Helix MLA pools do not support DSA (DeepSeek-V3.2) caches yet")
        super().__init__(local_pool_tokens(size, page_size, kvp), page_size, *args, **kwargs)
        self._init_helix(kvp, kvp_rank, size)

    def _store(self, layer_id: int, loc: torch.Tensor, rows_value: torch.Tensor) -> None:
        rows, _ = self.local_rows(loc)
        value = rows_value.to(self.dtype)
        if self.store_dtype != self.dtype:
            value = value.view(self.store_dtype)
        self.kv_buffer[layer_id - self.start_layer][rows] = value

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, layer_id_override=None):
        """cache_k [n, 1, R + Dr] latent + rope for logical locs [n] (cache_v unused)."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self._store(layer_id, loc, cache_k)

    def set_mla_kv_buffer(self, layer, loc_info, cache_k_nope, cache_k_rope, layer_id_override=None):
        """cache_k_nope [n, 1, R], cache_k_rope [n, 1, Dr] for logical locs [n]."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        parts = [cache_k_nope] + ([cache_k_rope] if cache_k_rope is not None and cache_k_rope.numel() else [])
        self._store(layer_id, loc, torch.cat([p.to(self.dtype) for p in parts], dim=-1))

    def get_mla_kv_buffer(self, layer, loc, dst_dtype=None):
        self._refuse("get_mla_kv_buffer", "prefill over a cached prefix needs the prefix pages "
                     "gathered from their KVP owners (not implemented yet); use --disable-radix-cache")

    def get_paged_kv(self, layer_id: int) -> torch.Tensor:
        """[slots, P, R + Dr] view for paged partial MLA attention."""
        kv = self.get_key_buffer(layer_id)
        return kv.view(-1, self.page_size, kv.shape[-1])


# ----------------------------------------------------------------------------- SGLang hooks


def helix_layout_of(configurator: Any) -> Optional[HelixConfig]:
    """The HelixConfig a KVCacheConfigurator's ServerArgs carries, or None (Helix off)."""
    return getattr(getattr(configurator, "server_args", None), LAYOUT_ATTR, None)


def _rank_of(layout: HelixConfig) -> int:
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.attn_tp_size != layout.world_size:
        raise HelixPoolError(f"attention TP size {par.attn_tp_size} != KVP x TPA = {layout.world_size}; "
                             f"set --tp-size {layout.world_size} (no DP attention / attention CP with Helix)")
    return par.attn_tp_rank


def _check_plain_model(kvc: Any) -> None:
    unsupported = {
        "draft worker (speculative decoding)": kvc.is_draft_worker,
        "hybrid sliding-window attention": kvc.is_hybrid_swa,
        "hybrid linear / Mamba layers": kvc.mambaish_config is not None,
        "--enable-kv-cache-sharding": kvc.kv_shard_size > 1,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise HelixPoolError(f"Helix KV pools do not support: {', '.join(bad)}; drop --enable-helix "
                             f"or those features")


def build_helix_pool(kvc: Any, layout: HelixConfig, logical_size: int):
    """The Helix KV pool of this rank for a KVCacheConfigurator `kvc` (logical capacity)."""
    from sglang.srt.runtime_context import get_exec

    _check_plain_model(kvc)
    rank = _rank_of(layout)
    common = dict(page_size=kvc.page_size, dtype=kvc.kv_cache_dtype,
                  layer_num=kvc.layer_info.num_effective_layers, device=kvc.device,
                  enable_memory_saver=get_exec().features.enable_memory_saver,
                  start_layer=kvc.layer_info.start_layer, end_layer=kvc.layer_info.end_layer,
                  kvp=layout.kvp, kvp_rank=layout.kvp_rank(rank))
    mc = kvc.model_config
    if kvc.use_mla_backend:
        return HelixMLATokenToKVPool(logical_size, kv_lora_rank=mc.kv_lora_rank,
                                     qk_rope_head_dim=mc.qk_rope_head_dim, **common)
    return HelixMHATokenToKVPool(logical_size, head_num=layout.kv_heads_per_tpa, head_dim=mc.head_dim,
                                 v_head_dim=mc.v_head_dim, enable_alt_stream=False, **common)


def _bytes_per_token(kvc: Any, heads: int) -> int:
    mc = kvc.model_config
    itemsize = torch._utils._element_size(kvc.kv_cache_dtype)
    if kvc.use_mla_backend:
        return (mc.kv_lora_rank + mc.qk_rope_head_dim) * itemsize
    return heads * (mc.head_dim + mc.v_head_dim) * itemsize


def logical_size_for(kvc: Any, layout: HelixConfig, stock_tokens: int) -> int:
    """Logical capacity of the Helix pool in the per-rank bytes SGLang budgeted for
    `stock_tokens` rows of its own pool (deterministic: pool, allocator and the scheduler's
    capacity report agree)."""
    from sglang.srt.runtime_context import get_parallel

    stock_heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return helix_logical_tokens(stock_tokens, _bytes_per_token(kvc, stock_heads),
                                _bytes_per_token(kvc, layout.kv_heads_per_tpa), kvc.page_size, layout.kvp)


def _around_build_pool(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    layout = helix_layout_of(kvc)
    if layout is None:
        return original(kvc, *args, **kwargs)
    size = logical_size_for(kvc, layout, kwargs["sizes"].max_total_num_tokens)
    pool = build_helix_pool(kvc, layout, size)
    logger.info("sglang_helix: Helix KV pool %s, logical tokens %d, local rows %d (KVP rank %d/%d)",
                type(pool).__name__, size, pool.size, pool.kvp_rank, layout.kvp)
    return pool


def _around_build_allocator(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    layout = helix_layout_of(kvc)
    if layout is None:
        return original(kvc, *args, **kwargs)
    if kwargs.get("token_to_kv_pool_allocator") is not None:
        raise HelixPoolError("a shared (draft) allocator reached the Helix hook; drop speculative decoding")
    pool = kwargs["token_to_kv_pool"]
    return HelixPagedAllocator(pool.logical_size, kvc.page_size, kvc.kv_cache_dtype, kvc.device, pool,
                               need_sort=_need_sort(), kvp=layout.kvp)


def _need_sort() -> bool:
    """SGLang sorts freed pages under PD disaggregation (as its own allocator branch does)."""
    from sglang.srt.runtime_context import get_disagg

    return get_disagg().disaggregation_mode in ("decode", "prefill")


def _around_logical_capacity(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    layout = helix_layout_of(kvc)
    if layout is None:
        return original(kvc, *args, **kwargs)
    return logical_size_for(kvc, layout, kwargs["max_total_num_tokens"])


def _around_check_full_pool(original: Callable, checker: Any, ps: Any, *args: Any, **kwargs: Any):
    """SGLang's leak check needs every free page (as it does for its own sharded allocator);
    available_size() is the min-color admission floor, so swap in aggregate_free_size()."""
    allocator = getattr(checker, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, HelixPagedAllocator):
        import dataclasses

        ps = dataclasses.replace(ps, full_available_size=allocator.aggregate_free_size())
    return original(checker, ps, *args, **kwargs)


POOL_HOOKS = (
    (POOL_TARGET, _around_build_pool),
    (ALLOCATOR_TARGET, _around_build_allocator),
    (CAPACITY_TARGET, _around_logical_capacity),
    (LEAK_CHECK_TARGET, _around_check_full_pool),
)


def install_pool_hooks() -> None:
    """Register the AROUND hooks on SGLang's KVCacheConfigurator (call from plugin.register()).

    Each hook calls straight through unless the configurator's ServerArgs has `_helix_layout`.
    """
    for target, hook in POOL_HOOKS:
        register_once(target, hook, "AROUND")


def pool_hooks_live() -> list[str]:
    """Targets whose live attribute does not (yet) wrap our hook; [] when all are applied."""
    return missing_hooks(POOL_HOOKS)


# ----------------------------------------------------------------------------- server info


def helix_kv_state(allocator: Any) -> Optional[dict]:
    """Helix KV state for /server_info (None unless `allocator` is a HelixPagedAllocator).

    Free lists are identical on every rank (SPMD), so one rank reports all KVP ranks:
    per_kvp_rank[c] = {"kvp_rank", "total_pages", "free_pages", "used_pages"} of color c, plus
    the logical capacity, the rows of one rank's pool (padding page excluded) and, for
    comparison, the rows a Helix-off pool of the same logical capacity would hold.
    """
    if not isinstance(allocator, HelixPagedAllocator):
        return None
    from .sglang_model import current_layout

    layout = current_layout()
    pool = allocator.get_kvcache()
    counts = allocator.color_free_counts()
    per = allocator.per_color
    return {
        "layout": None if layout is None else {
            "kvp": layout.kvp, "tpa": layout.tpa, "world_size": layout.world_size,
            "num_heads": layout.num_heads, "num_kv_heads": layout.num_kv_heads, "mla": layout.mla,
            "page_size": layout.page_size, "comm_backend": layout.comm_backend,
            "hopb_slices": layout.hopb_slices},
        "page_size": allocator.page_size,
        "logical_tokens": int(allocator.size),
        "local_pool_rows": int(pool.size),
        "helix_off_pool_rows": int(allocator.size),
        "available_tokens": int(allocator.available_size()),
        "per_kvp_rank": [{"kvp_rank": c, "total_pages": per, "free_pages": n, "used_pages": per - n}
                         for c, n in enumerate(counts)],
    }
