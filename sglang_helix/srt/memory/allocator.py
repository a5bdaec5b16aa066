"""KVP-colored page allocator for SGLang 0.5.23 (docs/math.md §1).

Logical page j of a request lives on KVP rank j % KVP. SGLang's radix cache, req_to_token and
scheduler only ever see *page ids* (loc // P), identical on every rank, so the allocator encodes
ownership in the id itself:

    color(page id p)        = p % KVP          (sharding.page_owner)
    local slot on its owner = p // KVP         (sharding.colored_page_id_to_slot)

`HelixPagedAllocator` hands logical page j of any request an id of color j % KVP, from KVP
per-color free lists that evolve identically on every rank (SPMD: the same scheduler stream, no
communication). Ids 0 .. KVP-1 are reserved: they map to local slot 0 of each rank, the padding
page SGLang writes dummy tokens into. Because a cached prefix page keeps its id, and its position
in any request that matches it is the same, prefix hits stay page-granular (P tokens).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...sharding import color_counts, new_page_indices, page_owner, pages_per_color
from .pools import HelixPoolError


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

    def take(self, colors: torch.Tensor) -> Optional[torch.Tensor]:
        """One free id of each color in `colors` [n] (host, in order), or None (nothing taken)."""
        colors = colors.to(torch.int64)
        need = torch.bincount(colors, minlength=self.kvp).tolist()
        if any(n > have for n, have in zip(need, self.counts())):
            return None
        ids = torch.empty(colors.numel(), dtype=torch.int64, device=self.device)
        for c, n in enumerate(need):
            if n:
                ids[(colors == c).nonzero().flatten().to(self.device)] = self.pop(c, n)
        return ids

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


class HelixPagedAllocator(_paged_base()):
    """SGLang paged allocator whose page ids carry their KVP owner as a color.

    size: logical token capacity (what the scheduler may hold across all KVP ranks);
    page_size: SGLang's page size P (>= 2: SGLang's page-size-1 path allocates without
        positions); kvp: KVP ranks. Allocatable ids: c + KVP*k, k = 1..pages_per_color.

    Interface of SGLang 0.5.23's PagedTokenToKVPoolAllocator: alloc_extend, alloc_decode, free,
    free_segment(s), free_page_ids, free_group_begin/end, merge_and_sort_free, available_size,
    get_all_free_pages, clear, resize; plus the scheduler capacity hooks
    get_extend_allocation_demand, evict_to_free_tokens and check_decode_capacity, made
    color-exact. Position-less `alloc(n)` is refused.
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
            "(the position-aware alloc_extend / alloc_decode are the Helix paths)."
        )

    def _pop_pages(self, page_index: torch.Tensor) -> Optional[torch.Tensor]:
        """Page ids for logical page indices [n] (batch order): color j % KVP each, or None."""
        return self.colors.take(page_owner(page_index, self.kvp))

    def alloc_colored_pages(self, colors: torch.Tensor) -> Optional[torch.Tensor]:
        """Fresh page ids of the given colors [n] (host; HiCache load-back: each device page takes
        the color of the host page it reloads), or None (nothing taken)."""
        return self.colors.take(colors)

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
        page_index, first, count = new_page_indices(prefix, seq, self.page_size)
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
        return self.kvp * max(color_counts(page_index, self.kvp)) * self.page_size

    def get_extend_allocation_demand(self, prefix_lens_cpu, seq_lens_cpu, *, conservative_num_tokens,
                                     shard_size):
        page_index, _, _ = new_page_indices(prefix_lens_cpu.tolist(), seq_lens_cpu.tolist(), self.page_size)
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


