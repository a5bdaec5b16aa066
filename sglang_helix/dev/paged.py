"""Paged KV caches for tests and benchmarks: one KVP rank's pages at shuffled physical slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sharding import local_num_pages


def build_local_paged_cache(
    seqs: Sequence[torch.Tensor],
    page_size: int,
    kvp: int,
    kvp_rank: int,
    *,
    seed: int = 0,
    spare_pages: int = 2,
    fill: float = 1000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One KVP rank's paged cache for a batch, with its pages at shuffled physical slots.

    seqs: per request b, the full sequence's per-token KV [L_b, *feat] (for GQA, K and V
        concatenated on the last dim; for MLA, [L_b, R + Dr]).
    Returns cache [num_phys_pages, P, *feat] (seqs' dtype) and the rank's local page table
        [B, max_local_pages] int32: entry [b, i] is the physical page of local page i of request b
        (local page i = logical page i*KVP + kvp_rank). Unused slots (spare pages, the tail of a
        partial page, padding columns -> page 0) hold `fill`, so reading them shows up in results.
    """
    if not seqs:
        raise ValueError("seqs must hold at least one request")
    feat, dtype = seqs[0].shape[1:], seqs[0].dtype
    local_pages = [int(local_num_pages(s.shape[0], kvp_rank, page_size, kvp)) for s in seqs]
    total = sum(local_pages) + spare_pages
    gen = torch.Generator().manual_seed(seed * 1009 + kvp_rank)
    perm = torch.randperm(total, generator=gen)
    cache = torch.full((total, page_size, *feat), fill, dtype=dtype)
    table = torch.zeros(len(seqs), max(1, max(local_pages)), dtype=torch.int32)
    next_free = 0
    for b, seq in enumerate(seqs):
        for i in range(local_pages[b]):
            logical = i * kvp + kvp_rank
            tokens = seq[logical * page_size : (logical + 1) * page_size]
            phys = int(perm[next_free])
            next_free += 1
            cache[phys, : tokens.shape[0]] = tokens
            table[b, i] = phys
    return cache, table

