"""Rank-local Helix KV pools for SGLang 0.5.23: only this rank's KVP color of the pages.

`HelixMHATokenToKVPool` (GQA: K/TPA heads) / `HelixMLATokenToKVPool` (the MLA latent) hold
(pages/KVP + 1) pages. Writes arrive with *logical* locs; a loc's page id p gives its owner
p % KVP and local slot p // KVP, local row slot * P + loc % P. Rows owned by other KVP ranks are
redirected to the padding page (slot 0: dropped, sync-free, fixed shapes).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import HelixError
from ...sharding import colored_page_id_to_slot, local_page_table, local_pool_tokens, local_seq_len, page_owner, pages_per_color


class HelixPoolError(HelixError):
    """A Helix pool/allocator request SGLang's path cannot satisfy; the message names the fix."""


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
        self._refuse("get_mla_kv_buffer", "each rank holds only its KVP pages, and the helix "
                     "attention backend attends a cached prefix where it lies (partial attention + "
                     "exchange), never gathering it; a non-helix MLA attention path reached the "
                     "pool: serve Helix with the helix backend the plugin declares")

    def get_paged_kv(self, layer_id: int) -> torch.Tensor:
        """[slots, P, R + Dr] view for paged partial MLA attention."""
        kv = self.get_key_buffer(layer_id)
        return kv.view(-1, self.page_size, kv.shape[-1])


