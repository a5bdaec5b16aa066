"""HiCache host tier for the Helix pools: each KVP rank backs up and loads back only its pages.

SGLang 0.5.23's HiCache mirrors device KV pages into a host pool (`--enable-hierarchical-cache`)
under the radix tree, whose nodes then carry host page ids next to (or instead of) device ones.
Under Helix a device page id p has color p % KVP and lives only on KVP rank p % KVP (local slot
p // KVP; srt.memory.allocator). The host tier keeps that rule in a second id space
(sharding.py, "HiCache host tier"):

- host page id h has color h % KVP and is local host slot h // KVP of rank h % KVP; every rank
  holds a host pool of 1/KVP of the logical host pages (SGLang's native host pool, built from
  this rank's device buffers, sized by --hicache-ratio / --hicache-size per rank);
- `HelixHostPool.alloc` hands out host ids of the device pages' colors (page by page), from KVP
  per-color free lists that evolve identically on every rank (the same scheduler stream), so
  the radix tree's host values are the same ids on every rank (SPMD);
- a transfer pairs (host id, device id) of one color; each rank keeps the pairs of its color and
  copies between its local rows only (`owned_rows`): nothing of another rank's pages is read or
  written, no communication;
- load-back allocates device ids of the host pages' colors (srt.memory.host_hooks), so a
  reloaded prefix page keeps the owner its logical position gives it.

`HelixHostPool` is a `PageInterleaveHostPool` (SGLang's own host pool for logical-page KV
sharding, whose arithmetic is the same: owner = page id % N, local row = (page id // N) * P +
offset), so SGLang's controller takes its sharded path (`is_kv_sharded`: owner-local transfer
rows, per-rank transfer bytes); the slots, their colors and the row math are Helix's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...sharding import (cyclic_colors, local_token_index, locs_of_page_ids, owned_local_rows,
                         page_ids_of_locs, token_owner)
from .allocator import _ColoredFreeLists
from .pools import HelixPoolError


def _interleave_host_base():
    from sglang.srt.mem_cache.pool_host.page_interleave import PageInterleaveHostPool

    return PageInterleaveHostPool


class HelixHostPlacement:
    """The placement interface SGLang's sharded controller reads (`local_mask`, `local_index`,
    `owner_of`, `filter_local`), by Helix's coloring of logical token locs (host or device)."""

    def __init__(self, kvp: int, page_size: int):
        self.kvp, self.page_size = kvp, page_size

    def owner_of(self, loc: torch.Tensor) -> torch.Tensor:
        return token_owner(loc.to(torch.int64), self.page_size, self.kvp)

    def local_index(self, loc: torch.Tensor) -> torch.Tensor:
        return local_token_index(loc.to(torch.int64), self.page_size, self.kvp)

    def local_mask(self, loc: torch.Tensor, rank: int) -> torch.Tensor:
        return self.owner_of(loc) == rank

    def filter_local(self, loc: torch.Tensor, rank: int) -> torch.Tensor:
        return owned_local_rows(loc, rank, self.page_size, self.kvp)[1]


class HelixHostPool(_interleave_host_base()):
    """One KVP rank's HiCache host pool: colored host page ids over SGLang's native host pool.

    host_pool: SGLang's MHA / MLA host pool built from this rank's Helix device pool (its rows are
    this rank's: page_num pages, page 0 the padding page); kvp, kvp_rank: the rank's KVP shard.
    Allocatable host ids: c + KVP*k, k = 1 .. page_num - 1, per color c.
    """

    def __init__(self, host_pool: Any, kvp: int, kvp_rank: int):
        if not 0 <= kvp_rank < kvp:
            raise HelixPoolError(f"kvp_rank={kvp_rank} outside [0, kvp={kvp})")
        # PageInterleaveHostPool.__init__ is skipped: its slots are SGLang's rotation classes
        self.host_pool = host_pool
        self.kvp, self.kvp_rank = kvp, kvp_rank
        self.shard_rank, self.shard_size = kvp_rank, kvp
        self.placement = HelixHostPlacement(kvp, host_pool.page_size)
        self.per_color = host_pool.page_num - 1
        self.clear()

    @property
    def logical_size(self) -> int:
        """Logical host tokens (every rank's pages)."""
        return self.kvp * self.per_color * self.page_size

    def clear(self) -> None:
        """Every host page free (ids < KVP reserved: each rank's padding slot 0)."""
        with self.host_pool.lock:
            self.colors = _ColoredFreeLists(self.kvp, self.per_color, "cpu")

    def color_free_counts(self) -> list[int]:
        """Free host pages per color (identical on every rank)."""
        return self.colors.counts()

    def available_size(self) -> int:
        """Logical host tokens surely allocatable for any colors: KVP x (scarcest color) x P
        (a run of consecutive logical pages takes ceil(n / KVP) of each color at most)."""
        return self.kvp * min(self.colors.counts()) * self.page_size

    def alloc(self, need_size: int, start_owner: Any = None) -> Optional[torch.Tensor]:
        """Host token indices [need_size] for need_size / P whole pages of the given colors.

        start_owner: the colors, [need_size / P] int (one per page, in order: the colors of the
        device pages being backed up), or an int (the first page's color, the others following
        cyclically: consecutive logical pages, as SGLang's sharded pool passes). None (no
        colors known) is refused. Returns None when some color has too few free pages."""
        if start_owner is None:
            raise HelixPoolError("a Helix HiCache host allocation reached without the colors of "
                                 "its pages (an unsupported HiCache path); drop "
                                 "--enable-hierarchical-cache with --enable-helix")
        if need_size % self.page_size:
            raise HelixPoolError(f"Helix HiCache host allocations take whole pages of "
                                 f"{self.page_size} tokens, got {need_size}")
        pages = need_size // self.page_size
        colors = (cyclic_colors(int(start_owner) % self.kvp, pages, self.kvp)
                  if isinstance(start_owner, int) else torch.as_tensor(start_owner).to(torch.int64))
        if colors.numel() != pages:
            raise HelixPoolError(f"{colors.numel()} page colors for {pages} host pages")
        with self.host_pool.lock:
            ids = self.colors.take(colors.cpu())
        if ids is None:
            return None
        return locs_of_page_ids(ids, self.page_size)

    def free(self, indices: torch.Tensor) -> int:
        """Return whole host pages (token indices [n], n a multiple of P) to their colors."""
        indices = indices.cpu()
        with self.host_pool.lock:
            self.colors.release(page_ids_of_locs(indices, self.page_size), staged=False)
        return len(indices)

    def owned_rows(self, host_indices: torch.Tensor,
                   device_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (host, device) pairing of one color per page, narrowed to this rank's pages, as
        local (host rows, device rows). Ownership is read off the host indices (CPU), so the
        device side is a gather: no device-to-host read."""
        owned, host_rows = owned_local_rows(host_indices.cpu(), self.kvp_rank, self.page_size, self.kvp)
        picked = device_indices[owned.nonzero().flatten().to(device_indices.device)]
        return host_rows, self.placement.local_index(picked)

    # ---- the storage tier (--hicache-storage-backend file; srt.memory.host_storage) ----------

    @property
    def storage_format_tag(self) -> str:
        """Tags storage keys with the Helix layout: a page file holds one rank's page."""
        native = self.host_pool.storage_format_tag
        return f"helix-kvp{self.kvp}" + (f"-{native}" if native else "")

    def _local_row(self, index: int) -> Optional[int]:
        owned, rows = owned_local_rows(torch.tensor([int(index)]), self.kvp_rank, self.page_size,
                                       self.kvp)
        return int(rows[0]) if bool(owned[0]) else None

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        """The host page starting at logical host index `index` if this rank stores it, else an
        empty tensor (another rank's page: nothing of it to write here)."""
        row = self._local_row(index)
        if row is None:
            return torch.empty(0, dtype=self.host_pool.dtype)
        return self.host_pool.get_data_page(row, flat=flat)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        """Store a page read from storage at logical host index `index` if this rank stores it
        (another rank's page is dropped: that rank reads its own)."""
        row = self._local_row(index)
        if row is not None:
            self.host_pool.set_from_flat_data_page(row, data_page)

    def get_page_buffer_meta(self, indices):
        raise HelixPoolError("zero-copy HiCache storage backends are not supported with Helix: "
                             "use --hicache-storage-backend file")

    def state(self) -> dict:
        """The host tier for /server_info: free lists are identical on every rank (SPMD), so one
        rank reports every KVP rank's host pages (per_kvp_rank[c]: color c), next to the logical
        host capacity, one rank's host rows (padding page included) and their bytes."""
        per = self.per_color
        return {
            "logical_tokens": self.logical_size,
            "local_pool_rows": int(self.host_pool.size),
            "host_bytes_per_rank": int(self.host_pool.size * self.host_pool.size_per_token),
            "layout": self.host_pool.layout,
            "per_kvp_rank": [{"kvp_rank": c, "total_pages": per, "free_pages": n, "used_pages": per - n}
                             for c, n in enumerate(self.colors.counts())],
        }
