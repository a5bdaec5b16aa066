"""Per-batch metadata for one KVP rank, planned once and read by every layer.

Decode (`HelixDecodeMetadata`): allocate once, plan per batch, layers read views.
Extend (`ExtendPlan`): the chunk and cached-prefix lengths of an extend batch as host ints plus
this rank's local prefix page table, built once per batch by `plan_extend`.

`plan` is the only place with host syncs (validating lengths against the page table, the max local
length a kernel may want for its grid). Buffers never move, so a captured CUDA graph that reads
`seq_lens_buf` / `page_table_buf` stays valid across plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

import torch

from .hopb import slice_bounds
from .sharding import local_seq_len


class HelixDecodeMetadata:
    """Per-rank decode metadata for a batch of up to `max_batch` requests.

    Buffers: seq_lens_buf [max_batch] int32 (local KV lengths on this rank),
             page_table_buf [max_batch, max_local_pages] int32 (physical page of local page i).
    After plan(): batch_size, seq_lens [B] and page_table [B, max_local_pages] views,
             max_local_len (int), slices (HOP-B [start, stop) bounds, non-empty).
    """

    def __init__(
        self,
        kvp: int,
        kvp_rank: int,
        page_size: int,
        *,
        max_batch: int,
        max_local_pages: int,
        hopb_slices: int = 1,
        device="cpu",
    ):
        if max_batch < 1 or max_local_pages < 1:
            raise ValueError(f"max_batch={max_batch} and max_local_pages={max_local_pages} "
                             f"must be >= 1")
        self.kvp, self.kvp_rank, self.page_size = kvp, kvp_rank, page_size
        self.hopb_slices = hopb_slices
        self.seq_lens_buf = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.page_table_buf = torch.zeros(
            max_batch, max_local_pages, dtype=torch.int32, device=device
        )
        self.batch_size = 0
        self.host_seq_lens: list[int] = []
        self.max_local_len = 0
        self.slices: list[tuple[int, int]] = []

    @property
    def max_batch(self) -> int:
        return self.seq_lens_buf.shape[0]

    @property
    def max_local_pages(self) -> int:
        return self.page_table_buf.shape[1]

    @property
    def seq_lens(self) -> torch.Tensor:
        """[B] int32 local KV lengths of the planned batch (a view of seq_lens_buf)."""
        return self.seq_lens_buf[: self.batch_size]

    @property
    def page_table(self) -> torch.Tensor:
        """[B, max_local_pages] int32 local page table of the planned batch (a view)."""
        return self.page_table_buf[: self.batch_size]

    def plan(self, seq_lens: torch.Tensor, local_page_table: torch.Tensor,
             local_lens: Optional[torch.Tensor] = None) -> None:
        """Fill the buffers for a batch.

        seq_lens: [B] logical (whole-sequence) lengths; local_page_table: [B, pages] this rank's
        page table (sharding.local_page_table of the logical one), pages <= max_local_pages.
        local_lens: [B] this rank's token counts when its pages are not the position-owned ones
        (draft-tree branches, spec_tree.local_tables_by_color); default local_seq_len(seq_lens).
        """
        bsz = self._check_shapes(seq_lens, local_page_table)
        local = (local_lens.to(torch.int64) if local_lens is not None else
                 local_seq_len(seq_lens.to(torch.int64), self.kvp_rank, self.page_size, self.kvp))
        needed = (local + self.page_size - 1) // self.page_size
        if bsz and int(needed.max()) > local_page_table.shape[1]:
            raise ValueError(
                f"local_page_table has {local_page_table.shape[1]} columns but a request needs "
                f"{int(needed.max())} local pages on KVP rank {self.kvp_rank}"
            )
        self.seq_lens_buf[:bsz].copy_(local.to(torch.int32))
        self.page_table_buf[:bsz].zero_()  # stale entries past a request's pages: point at page 0
        self.page_table_buf[:bsz, : local_page_table.shape[1]].copy_(local_page_table)
        self.batch_size = bsz
        self.host_seq_lens = local.tolist()  # plan-time copy: the CPU kernels' loop bounds
        self.max_local_len = max(self.host_seq_lens, default=0)
        self.slices = slice_bounds(bsz, self.hopb_slices)

    def _check_shapes(self, seq_lens: torch.Tensor, table: torch.Tensor) -> int:
        if seq_lens.dim() != 1 or table.dim() != 2 or table.shape[0] != seq_lens.shape[0]:
            raise ValueError(
                f"expected seq_lens [B] and local_page_table [B, pages], got "
                f"{tuple(seq_lens.shape)} and {tuple(table.shape)}"
            )
        bsz = seq_lens.shape[0]
        if bsz > self.max_batch:
            raise ValueError(f"batch {bsz} > max_batch={self.max_batch}")
        if table.shape[1] > self.max_local_pages:
            raise ValueError(f"local_page_table has {table.shape[1]} columns > max_local_pages="
                             f"{self.max_local_pages}")
        if bsz and int(seq_lens.min()) < 0:
            raise ValueError("seq_lens must be >= 0")
        return bsz


@dataclass(frozen=True)
class ExtendPlan:
    """One extend (prefill) batch as seen by KVP rank `kvp_rank`; shared by all layers.

    extend_lens [B]: new tokens per request (host ints; the chunk's rows are back to back);
    prefix_lens [B]: cached-prefix tokens per request (logical, host ints);
    local_prefix_lens [B]: of those, the tokens this rank holds (host ints);
    page_table: [B, pages] int32 local page slots of each request's prefix pages on this rank
        (None when no request has a cached prefix);
    chunk_masks: [B, n, n] bool: a draft tree's verify (every extend_lens n): chunk token i
        attends chunk token j where True (spec_tree.tree_masks); None: causal.
    """

    extend_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    local_prefix_lens: tuple[int, ...]
    page_table: Optional[torch.Tensor] = None
    chunk_masks: Optional[torch.Tensor] = None

    @property
    def has_prefix(self) -> bool:
        """True if some request has a cached prefix (on any rank: all ranks take one branch)."""
        return any(self.prefix_lens)

    @property
    def starts(self) -> tuple[int, ...]:
        """Row of each request's first new token in the chunk, [B + 1] with the total last."""
        return (0, *accumulate(self.extend_lens))


def plan_extend(extend_lens, prefix_lens, kvp_rank: int, page_size: int, kvp: int,
                local_tables=None, chunk_masks: Optional[torch.Tensor] = None) -> ExtendPlan:
    """Build the ExtendPlan of a batch.

    extend_lens / prefix_lens: host ints per request (identical on every rank).
    local_tables(prefix_lens_tensor) -> ([B, pages] local slots, ...): this rank's prefix page
    table; called only when some request has a cached prefix. chunk_masks: see ExtendPlan.
    """
    extend = tuple(int(n) for n in extend_lens)
    prefix = tuple(int(n) for n in prefix_lens) if prefix_lens is not None else (0,) * len(extend)
    if len(prefix) != len(extend) or min(extend + prefix, default=0) < 0:
        raise ValueError(f"extend_lens {extend} and prefix_lens {prefix} must be [B] ints >= 0")
    local = tuple(local_seq_len(p, kvp_rank, page_size, kvp) for p in prefix)
    table = None
    if any(prefix):
        if local_tables is None:
            raise ValueError("a batch with a cached prefix needs local_tables to build its page table")
        table = local_tables(torch.tensor(prefix, dtype=torch.int64))[0]
    if chunk_masks is not None and (chunk_masks.dim() != 3 or chunk_masks.shape[0] != len(extend)
                                    or any(n != chunk_masks.shape[-1] for n in extend)):
        raise ValueError(f"chunk_masks {tuple(chunk_masks.shape)} is not [B, n, n] for extend_lens {extend}")
    return ExtendPlan(extend, prefix, local, table, chunk_masks)
