"""Rank-local Helix KV pools for SGLang 0.5.23: only this rank's KVP color of the pages.

`HelixMHATokenToKVPool` (GQA: K/TPA heads) / `HelixMLATokenToKVPool` (the MLA latent) hold
(pages/KVP + 1) pages. Writes arrive with *logical* locs; a loc's page id p gives its owner
p % KVP and local slot p // KVP, local row slot * P + loc % P. Rows owned by other KVP ranks are
redirected to the padding page (slot 0: dropped, sync-free, fixed shapes).

FP8 KV (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): pages are stored as SGLang stores them (dtype the
fp8 type, store_dtype uint8, 1 byte per element) with its per-tensor scale convention
(kernels/kv_quant.py: x / k_scale, cast); writes never divide the caller's tensor in place.
`get_paged_kv` returns fp8 views; the kernels upcast them tile by tile. The block-scaled KV
caches (FP4, MXFP8) are refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import HelixError
from ...kernels import kv_quant
from ...sharding import (colored_page_id_to_slot, kv_move_is_local, local_page_table, local_pool_tokens,
                         local_seq_len, page_owner, pages_per_color)
from ...spec_tree import move_sources, moved_rows


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

    def _scaled(self, x: torch.Tensor, scale) -> torch.Tensor:
        """x in this pool's dtype: fp8 pages divide by the layer's scale first (kv_quant)."""
        if x.dtype == self.dtype:
            return x
        return kv_quant.quantize(x, self.dtype, scale if kv_quant.is_fp8(self.dtype) else None)

    def _refuse(self, what: str, fix: str):
        raise HelixPoolError(f"{type(self).__name__}.{what} is not supported under Helix: {fix}")

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        """KV of logical locs src_loc [n] -> tgt_loc [n], every layer, all sources read before
        any target is written (SGLang's semantics). Speculative decoding calls it on every rank
        alike: after a verify (the accepted path to its positions) and, for draft trees, to copy
        a prefix's tail page into each branch's first page.

        Moves within one KVP rank (chains: tgt == src) copy rows locally; a move across page
        colours (trees) runs spec_tree's cross-rank move: one all-gather over the KVP group
        (module doc of sglang_helix.spec_tree). The branch is a host check every rank agrees on."""
        if self.kvp == 1 or bool(kv_move_is_local(tgt_loc, src_loc, self.page_size, self.kvp).all()):
            tgt, owned = self.local_rows(tgt_loc)
            src, _ = self.local_rows(src_loc)
            tgt, src = tgt[owned], src[owned]
            for buffer in self._kv_buffers():
                buffer[tgt] = buffer[src]
            return
        self._move_across_ranks(tgt_loc, src_loc)

    def _move_across_ranks(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        """Every rank reads the sources it holds (others: the padding page), the KVP group
        all-gathers the rows as bytes, move i takes the row of rank token_owner(src_loc[i]), and
        each rank writes the targets it holds (others go to the padding page)."""
        import torch.distributed as dist

        buffers = self._kv_buffers()
        src, _ = self.local_rows(src_loc)
        tgt, _ = self.local_rows(tgt_loc)
        n = src.shape[0]
        send = torch.cat([buf[src].reshape(n, -1).view(torch.uint8) for buf in buffers], dim=1)
        recv = send.new_empty((self.kvp * n, send.shape[1]))
        dist.all_gather_into_tensor(recv, send, group=self.kvp_group())
        rows = moved_rows(recv.view(self.kvp, n, -1), move_sources(src_loc, self.page_size, self.kvp))
        start = 0
        for buf in buffers:
            width = buf[0].numel() * buf.element_size()
            buf[tgt] = rows[:, start:start + width].contiguous().view(buf.dtype).view(n, *buf.shape[1:])
            start += width

    def kvp_group(self):
        """The KVP process group of this rank (the Helix runtime's; tests set `_kvp_group`)."""
        group = getattr(self, "_kvp_group", None)
        if group is None:
            from .. import state

            rt = state.runtime()
            if rt is None:
                raise HelixPoolError("a KV move across KVP ranks needs the KVP group, created by the "
                                     "plugin's state hook after SGLang's initialize_model_parallel")
            group = rt.kvp_group
        return group

    def _kv_buffers(self) -> list[torch.Tensor]:
        """Every per-layer KV buffer this pool holds (rows = local token rows)."""
        raise NotImplementedError

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        """PD decode retraction (cpu_tensor backup): this rank's rows of logical locs `indices`
        to host memory (srt.memory.retraction)."""
        from .retraction import copy_out

        return copy_out(self, indices)

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        """Restore a get_cpu_copy backup into the rows of the new logical locs `indices` (same
        owner color per logical page, checked; srt.memory.retraction)."""
        from .retraction import restore

        restore(self, kv_cache_cpu, indices)


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
        if kwargs.get("quant_method") is not None:
            raise HelixPoolError("Helix pools store plain or fp8 (per-tensor scale) KV pages, not "
                                 "block-scaled ones: use --kv-cache-dtype auto, bf16, fp8_e4m3 or "
                                 "fp8_e5m2 (not mxfp8 / nvfp4 / fp4_mx_block16) with --enable-helix")
        if kwargs.get("post_capture_active"):
            raise HelixPoolError("Helix pools do not support post-capture KV resizing; drop it")
        super().__init__(local_pool_tokens(size, page_size, kvp), page_size, *args, **kwargs)
        if self.kv_cache_layout != "nhd":
            raise HelixPoolError(f"Helix pools need the NHD KV layout, got {self.kv_cache_layout}; "
                                 f"unset SGLANG_USE_HND_KVCACHE / SGLANG_AITER_KV_CACHE_LAYOUT")
        self._init_helix(kvp, kvp_rank, size)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        """cache_k [n, K/TPA, D], cache_v [n, K/TPA, Dv] for logical locs [n]; stores owned
        rows only (others land in the padding page). fp8 pages: cache_k / k_scale and
        cache_v / v_scale, cast (the caller's tensors are left intact)."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        if dcp_kv_mask is not None:
            raise HelixPoolError("dcp_kv_mask reached a Helix pool: drop --dcp-size with --enable-helix")
        loc, _, _ = unwrap_write_loc(loc_info)
        rows, _ = self.local_rows(loc)
        cache_k, cache_v = self._scaled(cache_k, k_scale), self._scaled(cache_v, v_scale)
        super().set_kv_buffer(layer, rows, cache_k, cache_v, None, None, layer_id_override)

    def _kv_buffers(self) -> list[torch.Tensor]:
        return [*self.k_buffer, *self.v_buffer]

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

    def _store(self, layer_id: int, loc: torch.Tensor, rows_value: torch.Tensor, k_scale=None) -> None:
        rows, _ = self.local_rows(loc)
        value = self._scaled(rows_value, k_scale)
        if self.store_dtype != self.dtype:
            value = value.view(self.store_dtype)
        self.kv_buffer[layer_id - self.start_layer][rows] = value

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, layer_id_override=None, k_scale=None):
        """cache_k [n, 1, R + Dr] latent + rope for logical locs [n] (cache_v unused).
        k_scale (fp8 pages): the layer's k_scale, divided out before the cast (SGLang's MLA pool
        takes no scale; its Triton backend divides the latent by k_scale before the write)."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self._store(layer_id, loc, cache_k, k_scale)

    def set_mla_kv_buffer(self, layer, loc_info, cache_k_nope, cache_k_rope, layer_id_override=None,
                          k_scale=None):
        """cache_k_nope [n, 1, R], cache_k_rope [n, 1, Dr] for logical locs [n]; k_scale as
        set_kv_buffer."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        parts = [cache_k_nope] + ([cache_k_rope] if cache_k_rope is not None and cache_k_rope.numel() else [])
        self._store(layer_id, loc, torch.cat(parts, dim=-1), k_scale)

    def _kv_buffers(self) -> list[torch.Tensor]:
        return list(self.kv_buffer)

    def get_mla_kv_buffer(self, layer, loc, dst_dtype=None):
        self._refuse("get_mla_kv_buffer", "each rank holds only its KVP pages, and the helix "
                     "attention backend attends a cached prefix where it lies (partial attention + "
                     "exchange), never gathering it; a non-helix MLA attention path reached the "
                     "pool: serve Helix with the helix backend the plugin declares")

    def get_paged_kv(self, layer_id: int) -> torch.Tensor:
        """[slots, P, R + Dr] view for paged partial MLA attention."""
        kv = self.get_key_buffer(layer_id)
        return kv.view(-1, self.page_size, kv.shape[-1])


