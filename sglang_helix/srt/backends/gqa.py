"""The "helix" attention backend for GQA models (Llama/Mistral, Qwen2, Qwen3) in SGLang 0.5.23.

Contract with the model (srt.models.gqa makes the attention classes honour it): on global rank
g = tpa_rank * KVP + kvp_rank the attention layer hands the backend
    q [T, H/TPA * D]   the query heads of its TPA group,
    k [T, K/TPA, D], v [T, K/TPA, Dv]   the new tokens' KV of its TPA group's heads,
and receives [T, H/N * Dv], query heads [g*H/N, (g+1)*H/N), what a row-parallel o_proj with
TP = N expects on rank g. Decode: write k/v through the Helix pool (only this KVP rank's pages
keep them), partial attention over this rank's pages, one exchange, LSE merge. Extend: base.
"""

from __future__ import annotations

import torch

from ...kernel_path import KernelInputs
from ..memory.pools import HelixMHATokenToKVPool
from .base import HelixBackendBase


class HelixGQABackend(HelixBackendBase):
    """SGLang attention backend of one Helix rank (GQA); see HelixBackendBase for arguments."""

    mla = False

    @classmethod
    def pool_type(cls) -> type:
        return HelixMHATokenToKVPool

    def kernel_inputs(self, q_dtype: torch.dtype) -> KernelInputs:
        pool = self.pool
        return KernelInputs(False, q_dtype, pool.dtype, self.cfg.heads_per_tpa, pool.head_dim, pool.v_head_dim,
                            pool.page_size)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """q [B, H/TPA * D] (or [B, H/TPA, D]); k/v [B, K/TPA, D/Dv] of the new tokens.

        Returns [B, H/N * Dv] in q's dtype.
        """
        self._decode_ready(forward_batch)
        if save_kv_cache and k is not None and v is not None:
            self._store(k, v, layer, forward_batch)
        q3 = q.reshape(q.shape[0], self.cfg.heads_per_tpa, -1)
        k_cache, v_cache = self.pool.get_paged_kv(layer.layer_id)
        k_scale, v_scale = self.kv_scales(layer)
        out = self.helix.forward_gqa(q3, k_cache, v_cache, layer.scaling, k_scale=k_scale, v_scale=v_scale)
        return out.reshape(out.shape[0], -1)

    def _extend_inputs(self, q, k, v, layer):
        q3 = q.reshape(q.shape[0], self.cfg.heads_per_tpa, -1)
        k_pages, v_pages = self.pool.get_paged_kv(layer.layer_id)
        k_new = self._as_stored(k, getattr(layer, "k_scale", None))
        v_new = self._as_stored(v, getattr(layer, "v_scale", None))
        return q3, k_new, v_new, k_pages, v_pages
