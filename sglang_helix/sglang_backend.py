"""The "helix" attention backend for SGLang 0.5.23: GQA decode and extend over a Helix KV pool.

Contract with the model (sglang_helix.sglang_model makes LlamaAttention honour it): on global
rank g = tpa_rank * KVP + kvp_rank the attention layer hands the backend
    q [T, H/TPA * D]   the query heads of its TPA group,
    k [T, K/TPA, D], v [T, K/TPA, Dv]   the new tokens' KV of its TPA group's heads,
and receives [T, H/N * Dv], query heads [g*H/N, (g+1)*H/N) — what a row-parallel o_proj with
TP = N expects on rank g.

Decode (per layer): write k/v through the Helix pool (only this KVP rank's pages keep them),
partial attention over this rank's pages, one exchange in the KVP group, LSE merge
(sglang_helix.helix.HelixAttention; HOP-B slices when --helix-hopb-slices > 1).

Extend (prefill, chunked prefill, cached radix prefix): every rank has the chunk's K/V of its
TPA heads, but a cached prefix lives on its KVP owners. Each query token is a row with its
request's local page table and local *prefix* length; partial attention over the local prefix
pages, one exchange (T rows) gives each rank its H/N heads' partials from every KVP rank; these
are LSE-merged with the rank's own causal attention over the chunk (computed with its LSE).
No prefix KV moves between ranks. The per-batch tables are built once in
init_forward_metadata.

The KVP group comes from sglang_helix.sglang_model.runtime() (created collectively right after
SGLang's initialize_model_parallel); the constructor runs no collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .attention import merge_partials, partial_attention_gqa
from .comm import make_exchange
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


@dataclass
class HelixExtendMetadata:
    """Per-batch extend plan (shared by all layers).

    lens: [B] chunk lengths (host ints); prefix_rows: True when some request has a cached prefix;
    row_table [T, pages] int32 local page slots of each query token's request; row_lens [T]
    int32 local prefix length of each query token's request.
    """

    lens: list
    prefix_rows: bool
    row_table: Optional[torch.Tensor] = None
    row_lens: Optional[torch.Tensor] = None


class HelixAttnBackend(_base()):
    """SGLang attention backend of one Helix rank (GQA).

    model_runner: needs .device, .req_to_token_pool (.req_to_token [reqs, ctx]),
        .token_to_kv_pool (a HelixMHATokenToKVPool), .server_args (with `_helix_layout`) and
        .model_config.context_len.
    rank: global attention rank g (default: the Helix runtime's, else SGLang's attn_tp_rank).
    kvp_group: this rank's KVP group (default: sglang_helix.sglang_model.runtime().kvp_group).
    impl: partial-attention implementation (sglang_helix.attention).
    """

    def __init__(self, model_runner: Any, *, rank: Optional[int] = None, kvp_group=None, impl: str = "auto"):
        super().__init__()
        self.cfg = _layout_of(model_runner)
        if self.cfg.mla:
            raise HelixConfigError("the helix GQA backend got an MLA layout; MLA pools dispatch to "
                                   "sglang_helix.sglang_mla (create_helix_backend)")
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = _helix_pool_of(model_runner)
        self.rank, group = _rank_and_group(self.cfg, rank, kvp_group)
        if self.cfg.kvp_rank(self.rank) != self.pool.kvp_rank:
            raise HelixPoolError(f"pool holds KVP rank {self.pool.kvp_rank} but rank {self.rank} is KVP "
                                 f"rank {self.cfg.kvp_rank(self.rank)}")
        self.max_pages = math.ceil(model_runner.model_config.context_len / self.cfg.page_size)
        self.helix = HelixAttention(
            self.cfg, self.rank, group, max_batch=self.req_to_token_pool.req_to_token.shape[0],
            max_local_pages=max(1, math.ceil(self.max_pages / self.cfg.kvp)), impl=impl, device=self.device,
        )
        self.impl = impl
        # extend needs the received partials (LSE included); ag_rs reduces in flight
        self.extend_exchange = (self.helix.exchange if self.cfg.comm_backend != "ag_rs"
                                else make_exchange("a2a", group, self.cfg.kvp))
        self.forward_metadata = None
        self.extend_metadata: Optional[HelixExtendMetadata] = None

    # ---- metadata ---------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Decode: this rank's local page table [B, pages/KVP] and local lengths, planned once
        for all layers. Extend: per-query-token local prefix tables (HelixExtendMetadata)."""
        if forward_batch.forward_mode.is_decode():
            self.extend_metadata = None
            seq_lens = forward_batch.seq_lens
            rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
            pages = -(-int(seq_lens.max()) // self.cfg.page_size) if seq_lens.numel() else 1
            table, _ = self.pool.local_decode_tables(rows, seq_lens, max_pages=pages)
            self.helix.plan(seq_lens, table)
            self.forward_metadata = self.helix.meta
            return
        self.forward_metadata = None
        self.extend_metadata = self._plan_extend(forward_batch)

    def _plan_extend(self, forward_batch: Any) -> HelixExtendMetadata:
        lens = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        prefix_cpu = forward_batch.extend_prefix_lens_cpu
        prefix = [int(x) for x in prefix_cpu] if prefix_cpu is not None else [0] * len(lens)
        if not any(prefix):
            return HelixExtendMetadata(lens, False)
        prefix_t = torch.tensor(prefix, dtype=torch.int64, device=self.device)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        pages = max(1, -(-max(prefix) // self.cfg.page_size))
        table, local = self.pool.local_decode_tables(rows, prefix_t, max_pages=pages)
        repeat = torch.tensor(lens, dtype=torch.int64, device=self.device)
        return HelixExtendMetadata(lens, True, table.repeat_interleave(repeat, dim=0).contiguous(),
                                   local.repeat_interleave(repeat, dim=0).contiguous())

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
        """Prefill chunk: q [T, H/TPA * D], k [T, K/TPA, D], v [T, K/TPA, Dv] -> [T, H/N * Dv].

        Causal attention over the chunk for this rank's H/N heads, LSE-merged with the cached
        prefix's partials (local pages, exchanged across KVP ranks) when there is a prefix.
        """
        meta = self.extend_metadata
        if meta is None:
            meta = self.extend_metadata = self._plan_extend(forward_batch)
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q3 = q.reshape(q.shape[0], self.cfg.heads_per_tpa, -1)
        out, lse = self._chunk_attention(q3, k, v, layer.scaling, meta.lens)
        if meta.prefix_rows:
            outs, lses = self._prefix_partials(q3, layer, meta)
            outs = torch.cat([outs.float(), out.unsqueeze(0)])
            lses = torch.cat([lses, lse.unsqueeze(0)])
            out = merge_partials(outs, lses)[0]
        return out.to(q.dtype).reshape(q.shape[0], -1)

    def _prefix_partials(self, q3, layer, meta: HelixExtendMetadata):
        """Partials of every KVP rank over the cached prefix for this rank's heads:
        outs [KVP, T, H/N, Dv], lses [KVP, T, H/N] fp32 (-inf where a rank has no prefix token)."""
        k_cache, v_cache = self.pool.get_paged_kv(layer.layer_id)
        out, lse = partial_attention_gqa(q3, k_cache, v_cache, meta.row_table, meta.row_lens,
                                         layer.scaling, impl=self.impl, check_lengths=False)
        return self.extend_exchange.start(out.to(q3.dtype).contiguous(), lse.float().contiguous()).partials()

    def _chunk_attention(self, q, k, v, scale: float, lens):
        """Causal attention within each request's chunk for this rank's H/N heads.

        q [T, H/TPA, D], k [T, K/TPA, D], v [T, K/TPA, Dv] -> (out [T, H/N, Dv] fp32,
        lse [T, H/N] fp32 natural log).
        """
        hn, local = self.cfg.heads_per_rank, self.cfg.kvp_rank(self.rank)
        group = self.cfg.heads_per_tpa // self.cfg.kv_heads_per_tpa
        q = q[:, local * hn : (local + 1) * hn].float()
        kv_idx = torch.arange(local * hn, (local + 1) * hn, device=q.device) // group
        k, v = k[:, kv_idx].float(), v[:, kv_idx].float()
        outs, lses, start = [], [], 0
        for n in lens:
            o, l = causal_attention_lse(q[start : start + n], k[start : start + n], v[start : start + n], scale)
            outs.append(o)
            lses.append(l)
            start += n
        return torch.cat(outs), torch.cat(lses)

    def support_triton(self):
        return False


def causal_attention_lse(q, k, v, scale: float):
    """q [n, h, D], k [n, h, D], v [n, h, Dv] (fp32) -> out [n, h, Dv], lse [n, h] (natural log);
    token t attends to tokens 0..t of the same chunk."""
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    s.masked_fill_(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [h, n]
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse.unsqueeze(-1)), v)
    return out, lse.transpose(0, 1)


def _rank_and_group(cfg: HelixConfig, rank: Optional[int], kvp_group):
    """(global attention rank, KVP group): explicit arguments win, else the Helix runtime."""
    from .sglang_model import runtime

    rt = runtime()
    if rank is None:
        rank = rt.rank if rt is not None else _attn_rank()
    if kvp_group is None and cfg.kvp > 1:
        if rt is None:
            raise HelixConfigError(
                "the helix backend needs its KVP group, created right after SGLang's "
                "initialize_model_parallel by sglang_helix.sglang_model (is the plugin's AFTER hook "
                "live? it is installed by sglang_helix.plugin.register())")
        kvp_group = rt.kvp_group
    return rank, kvp_group


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


def create_helix_backend(model_runner: Any):
    """Factory SGLang's attention registry calls for "helix": GQA here, MLA pools go to
    sglang_helix.sglang_mla.create_helix_mla_backend."""
    from .sglang_pool import HelixMLATokenToKVPool

    if isinstance(model_runner.token_to_kv_pool, HelixMLATokenToKVPool):
        from .sglang_mla import create_helix_mla_backend

        return create_helix_mla_backend(model_runner)
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
