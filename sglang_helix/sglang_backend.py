"""The "helix" attention backend for SGLang 0.5.23: GQA decode over a Helix KV pool.

Contract with the model (the end-to-end work must make the model honour it; see
docs/sglang-integration.md §5): on global rank g = tpa_rank * KVP + kvp_rank the attention layer
hands the backend
    q [T, H/TPA * D]   the query heads of its TPA group,
    k [T, K/TPA, D], v [T, K/TPA, Dv]   the new tokens' KV of its TPA group's heads,
and receives [T, H/N * Dv], query heads [g*H/N, (g+1)*H/N) — what a row-parallel o_proj with
TP = N expects on rank g.

Decode (per layer): write k/v through the Helix pool (only this KVP rank's pages keep them),
partial attention over this rank's pages, one exchange in the KVP group, LSE merge
(sglang_helix.helix.HelixAttention). Metadata (local page tables, local lengths) is built once
per batch in init_forward_metadata. Extend (prefill) supports chunks without a cached prefix
(every rank has the chunk's K/V of its heads; no exchange); a cached prefix would need its pages
from the other KVP ranks and is refused with the fix.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import HelixConfig, HelixConfigError
from .helix import HelixAttention
from .sglang_pool import LAYOUT_ATTR, HelixMHATokenToKVPool, HelixPoolError

BACKEND_NAME = "helix"


def create_kvp_groups(cfg: HelixConfig, rank: int, group_factory=None):
    """Create every TPA group's KVP process group (collective: call on all N ranks, same order).

    Group t holds global ranks cfg.kvp_group_ranks(t) = [t*KVP, ..., t*KVP + KVP-1], so group
    rank == KVP rank. Returns this rank's group (None when KVP == 1: no exchange).
    group_factory: defaults to torch.distributed.new_group (ranks are global ranks of the
    default group, which must be the N attention ranks).
    """
    if cfg.kvp == 1:
        return None
    factory = group_factory or dist.new_group
    mine = None
    for tpa_rank in range(cfg.tpa):
        group = factory(ranks=cfg.kvp_group_ranks(tpa_rank))
        if tpa_rank == cfg.tpa_rank(rank):
            mine = group
    return mine


def _base():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


class HelixAttnBackend(_base()):
    """SGLang attention backend of one Helix rank (GQA).

    model_runner: needs .device, .req_to_token_pool (.req_to_token [reqs, ctx]),
        .token_to_kv_pool (a HelixMHATokenToKVPool), .server_args (with `_helix_layout`) and
        .model_config.context_len.
    rank: global attention rank g (default: SGLang's attn_tp_rank).
    kvp_group: this rank's KVP group (default: create_kvp_groups, collective).
    impl: partial-attention implementation (sglang_helix.attention).
    """

    def __init__(self, model_runner: Any, *, rank: Optional[int] = None, kvp_group=None, impl: str = "auto"):
        super().__init__()
        self.cfg = _layout_of(model_runner)
        if self.cfg.mla:
            raise HelixConfigError("the helix backend serves GQA models; MLA goes through the "
                                   "DeepSeek attention path (not implemented yet)")
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = _helix_pool_of(model_runner)
        self.rank = _attn_rank() if rank is None else rank
        if self.cfg.kvp_rank(self.rank) != self.pool.kvp_rank:
            raise HelixPoolError(f"pool holds KVP rank {self.pool.kvp_rank} but rank {self.rank} is KVP "
                                 f"rank {self.cfg.kvp_rank(self.rank)}")
        group = kvp_group if kvp_group is not None else create_kvp_groups(self.cfg, self.rank)
        max_pages = math.ceil(model_runner.model_config.context_len / self.cfg.page_size)
        self.max_pages = max_pages
        self.helix = HelixAttention(
            self.cfg, self.rank, group, max_batch=self.req_to_token_pool.req_to_token.shape[0],
            max_local_pages=max(1, math.ceil(max_pages / self.cfg.kvp)), impl=impl, device=self.device,
        )
        self.forward_metadata = None

    # ---- metadata ---------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Decode: this rank's local page table [B, pages/KVP] and local lengths, planned once
        for all layers. Extend: nothing (refused later if a prefix is cached)."""
        if not forward_batch.forward_mode.is_decode():
            self.forward_metadata = None
            return
        seq_lens = forward_batch.seq_lens
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        pages = -(-int(seq_lens.max()) // self.cfg.page_size) if seq_lens.numel() else 1
        table, _ = self.pool.local_decode_tables(rows, seq_lens, max_pages=pages)
        self.helix.plan(seq_lens, table)
        self.forward_metadata = self.helix.meta

    # ---- forward ----------------------------------------------------------------

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        """q [B, H/TPA * D] (or [B, H/TPA, D]); k/v [B, K/TPA, D/Dv] of the new tokens.

        Returns [B, H/N * Dv] in q's dtype.
        """
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q3 = q.reshape(q.shape[0], self.cfg.heads_per_tpa, -1)
        k_cache, v_cache = self.pool.get_paged_kv(layer.layer_id)
        out = self.helix.forward_gqa(q3, k_cache, v_cache, layer.scaling)
        return out.reshape(out.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        """Prefill without a cached prefix: causal attention over the chunk for this rank's H/N
        heads (every rank has the chunk's KV of its TPA heads). Returns [T, H/N * Dv]."""
        prefix = forward_batch.extend_prefix_lens_cpu
        if prefix is not None and any(int(x) for x in prefix):
            raise HelixPoolError("helix extend over a cached prefix needs that prefix's KV from the "
                                 "other KVP ranks (not implemented yet); use --disable-radix-cache "
                                 "and no chunked prefill (--chunked-prefill-size -1)")
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q3 = q.reshape(q.shape[0], self.cfg.heads_per_tpa, -1)
        return self._chunk_attention(q3, k, v, layer.scaling, forward_batch.extend_seq_lens_cpu)

    def _chunk_attention(self, q, k, v, scale: float, lens) -> torch.Tensor:
        """q [T, H/TPA, D], k [T, K/TPA, D], v [T, K/TPA, Dv] -> [T, H/N * Dv] (own head slice)."""
        hn, local = self.cfg.heads_per_rank, self.cfg.kvp_rank(self.rank)
        group = self.cfg.heads_per_tpa // self.cfg.kv_heads_per_tpa
        q = q[:, local * hn : (local + 1) * hn]
        kv_idx = torch.arange(local * hn, (local + 1) * hn, device=q.device) // group
        outs, start = [], 0
        for n in (int(x) for x in lens):
            qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k[:, kv_idx], v[:, kv_idx]))
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.float(), ks.float(), vs.float(), is_causal=True, scale=scale)
            outs.append(o.transpose(0, 1).to(q.dtype))
            start += n
        return torch.cat(outs).reshape(q.shape[0], -1)

    def support_triton(self):
        return False


def _layout_of(model_runner: Any) -> HelixConfig:
    cfg = getattr(model_runner.server_args, LAYOUT_ATTR, None)
    if cfg is None:
        raise HelixConfigError("--attention-backend helix needs --enable-helix (no Helix layout on "
                               "ServerArgs)")
    return cfg


def _helix_pool_of(model_runner: Any) -> HelixMHATokenToKVPool:
    pool = model_runner.token_to_kv_pool
    if not isinstance(pool, HelixMHATokenToKVPool):
        raise HelixPoolError(f"the helix backend needs the Helix KV pool, got {type(pool).__name__}: "
                             f"call sglang_helix.sglang_pool.install_pool_hooks() in plugin.register()")
    return pool


def _attn_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_rank


def create_helix_backend(model_runner: Any) -> HelixAttnBackend:
    """Factory SGLang's attention registry calls for "helix"."""
    return HelixAttnBackend(model_runner)


def register_helix_backend() -> None:
    """Register "helix" in SGLang's attention registry and the --attention-backend choices.

    Idempotent; call from plugin.register().
    """
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    register_attention_backend(BACKEND_NAME)(create_helix_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
