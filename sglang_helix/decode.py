"""HelixAttention: one rank's decode attention = partial attention over its pages + exchange.

Rank g = tpa_rank * KVP + kvp_rank (config.py). Its TPA group computes H/TPA query heads
(GQA: the K/TPA KV heads it stores; MLA: TPA = 1, all H heads against the one latent head).
After the exchange the rank holds query-head slice g of H/N heads, merged over all KVP shards:
[B, H/N, Dv], ready for a row-parallel o_proj with TP = N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention import merge_partials, partial_attention_gqa, partial_attention_mla, project_values
from .comm import make_exchange, partial_dtype
from .config import HelixConfig, HelixConfigError
from .hopb import run_hopb
from .kernel_path import KernelPath, resolve_kernel_path
from .metadata import HelixDecodeMetadata


class HelixAttention:
    """Helix decode attention of global attention rank `rank`.

    group: the KVP process group of this rank, ordered as cfg.kvp_group_ranks(tpa_rank) (so
        group rank == KVP rank); None allowed only when cfg.kvp == 1.
    max_batch, max_local_pages: capacity of the preallocated metadata buffers.
    kernels: the KernelPath its partial attention and merge run (sglang_helix.kernel_path; a helix
        backend resolves it with the pool's dtypes and dims), or a request name resolved here
        once, without inputs ("auto": torch on CPU, Triton on CUDA; no GPU library).
    """

    def __init__(
        self,
        cfg: HelixConfig,
        rank: int,
        group,
        *,
        max_batch: int,
        max_local_pages: int,
        kernels: KernelPath | str = "auto",
        device="cpu",
    ):
        self.cfg, self.rank = cfg, rank
        if not isinstance(kernels, KernelPath):
            kernels = resolve_kernel_path(kernels, device, mla=cfg.mla)
        if kernels.mla != cfg.mla:
            raise HelixConfigError(f"kernels {kernels.describe()} are for {'MLA' if kernels.mla else 'GQA'}, "
                                   f"the HelixConfig is {'MLA' if cfg.mla else 'GQA'}")
        self.kernels = kernels
        self.kvp_rank, self.tpa_rank = cfg.kvp_rank(rank), cfg.tpa_rank(rank)
        _check_group(cfg, self.kvp_rank, group)
        self.exchange = make_exchange(cfg.comm_backend, group, cfg.kvp,
                                      merge=lambda outs, lses: merge_partials(outs, lses, kernels))
        self.meta = HelixDecodeMetadata(
            cfg.kvp,
            self.kvp_rank,
            cfg.page_size,
            max_batch=max_batch,
            max_local_pages=max_local_pages,
            hopb_slices=cfg.hopb_slices,
            device=device,
        )

    def plan(self, seq_lens: torch.Tensor, local_page_table: torch.Tensor,
             local_lens: torch.Tensor | None = None) -> None:
        """seq_lens [B] logical lengths; local_page_table [B, pages] this rank's pages;
        local_lens [B] its tokens where they are not the position-owned ones (metadata.plan)."""
        self.meta.plan(seq_lens, local_page_table, local_lens)

    def forward_gqa(self, q, k_cache, v_cache, scale: float, *, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
        """q [B, H/TPA, D]; k_cache [pages, P, K/TPA, D]; v_cache [pages, P, K/TPA, Dv] (q's
        dtype, or fp8 pages with per-tensor k_scale / v_scale: kernels/kv_quant.py).

        Returns [B, H/N, Dv] in q's dtype: query heads [g*H/N, (g+1)*H/N).
        """
        if self.cfg.mla:
            raise HelixConfigError("forward_gqa called on an MLA HelixConfig; use forward_mla")
        self._check_q(q, self.cfg.heads_per_tpa)
        if k_cache.dim() != 4 or k_cache.shape[2] != self.cfg.kv_heads_per_tpa:
            raise ValueError(f"k_cache must be [pages, P, K/TPA={self.cfg.kv_heads_per_tpa}, D], "
                             f"got {tuple(k_cache.shape)}")
        return self._decode(partial_attention_gqa, (q,), (k_cache, v_cache), scale, k_scale, v_scale)

    def forward_mla(self, q_latent, q_rope, kv_cache, scale: float, w_uv=None, *,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q_latent [B, H, R] (absorbed); q_rope [B, H, Dr]; kv_cache [pages, P, R + Dr] (q's
        dtype, or fp8 pages: k_scale for the scores, v_scale for the values).

        cfg.mla_exchange "latent" (w_uv None): returns [B, H/N, R] latent outputs (before W_UV).
        "value": w_uv [H, R, Dv] is W_UV of all H heads; each rank projects its partial
        (LSE unchanged) before the exchange, which then moves Dv instead of R per head, and
        returns [B, H/N, Dv] values. Both in q_latent's dtype.
        """
        if not self.cfg.mla:
            raise HelixConfigError("forward_mla called on a GQA HelixConfig; use forward_gqa")
        if (w_uv is not None) != (self.cfg.mla_exchange == "value"):
            raise HelixConfigError(
                f"mla_exchange={self.cfg.mla_exchange!r} "
                f"{'needs' if w_uv is None else 'takes no'} w_uv (W_UV of all heads, [H, R, Dv])")
        self._check_q(q_latent, self.cfg.num_heads)
        return self._decode(partial_attention_mla, (q_latent, q_rope), (kv_cache,), scale, k_scale, v_scale,
                            w_uv)

    def _decode(self, entry, queries: tuple, caches: tuple, scale: float, k_scale: float, v_scale: float,
                w_uv=None) -> torch.Tensor:
        """The one decode run of GQA and MLA: per HOP-B slice, the partial over this rank's pages
        (entry: the validated GQA or MLA entry point, on this rank's KernelPath) with the batch
        rows of `queries`, then exchange + merge. Returns [B, H/N, Dv] in the queries' dtype."""
        meta, dtype = self.meta, queries[0].dtype
        sent = partial_dtype(self.cfg.exchange_dtype, dtype)

        def partial(start: int, stop: int):
            out, lse = entry(
                *(t[start:stop] for t in queries), *caches, meta.page_table[start:stop],
                meta.seq_lens[start:stop], scale, self.kernels, check_lengths=False,
                host_seq_lens=meta.host_seq_lens[start:stop], k_scale=k_scale, v_scale=v_scale,
                out_dtype=sent,
            )
            if w_uv is not None:  # MLA value exchange: the merge commutes with the per-head W_UV
                out = project_values(out, w_uv, sent)
            return _for_exchange(out, lse, sent)

        return run_hopb(partial, self.exchange, meta.batch_size, meta.slices).to(dtype)

    def _check_q(self, q: torch.Tensor, heads: int) -> None:
        if q.dim() != 3 or q.shape[1] != heads:
            raise ValueError(f"q must be [B, {heads}, D] on rank {self.rank}, got {tuple(q.shape)}")
        if q.shape[0] != self.meta.batch_size:
            raise ValueError(f"q has batch {q.shape[0]} but plan() was called for "
                             f"{self.meta.batch_size} requests")


def _for_exchange(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """Partials travel in `dtype` (cfg.exchange_dtype: fp32 by default, the merged result then
    rounded to the activation dtype once; docs/math.md section 4), the LSE in fp32."""
    return out.to(dtype).contiguous(), lse.to(torch.float32).contiguous()


def _check_group(cfg: HelixConfig, kvp_rank: int, group) -> None:
    if group is None:
        if cfg.kvp > 1:
            raise HelixConfigError(f"kvp={cfg.kvp} needs this rank's KVP process group, got None")
        return
    if dist.get_world_size(group) != cfg.kvp:
        raise HelixConfigError(f"KVP group has {dist.get_world_size(group)} ranks, kvp={cfg.kvp}")
    if dist.get_rank(group) != kvp_rank:
        raise HelixConfigError(
            f"group rank {dist.get_rank(group)} != KVP rank {kvp_rank}: build the group from "
            f"cfg.kvp_group_ranks(tpa_rank) so that head slice d lands on KVP rank d"
        )
