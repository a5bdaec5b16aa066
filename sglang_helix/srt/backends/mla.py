"""The "helix" attention backend for absorbed MLA (DeepSeek-V2/V3) in SGLang 0.5.23.

Inputs from the Helix model path (srt.models.deepseek.helix_absorb_core): q [T, H, R+Dr] (or
[T, H*(R+Dr)]) for ALL H heads, k [T, 1, R+Dr] (latent | rope of the new tokens), v [T, 1, R];
returns [T, H/N * R], latent outputs of heads [g*H/N, (g+1)*H/N) merged over all KVP ranks.
With --helix-mla-exchange value the model path also passes w_uv=[H, R, Dv] (W_UV of all heads)
and gets [T, H/N * Dv] values: each rank projects its partials before the exchange.
Every rank computes the latent of every new token; the pool keeps the owner's rows only.
Decode: partial over this rank's pages for all H heads + one exchange + merge. Extend: base
(the latent's first R dims are the values).
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import HelixConfigError
from ...kernel_path import KernelInputs
from ..memory.pools import HelixMLATokenToKVPool
from .base import BACKEND_NAME, HelixBackendBase


class HelixMLABackend(HelixBackendBase):
    """SGLang attention backend of one Helix rank for absorbed MLA; arguments as the base."""

    mla = True

    def __init__(self, model_runner: Any, **kwargs: Any):
        self.kv_lora_rank = model_runner.model_config.kv_lora_rank
        super().__init__(model_runner, **kwargs)

    @classmethod
    def pool_type(cls) -> type:
        return HelixMLATokenToKVPool

    def kernel_inputs(self, q_dtype: torch.dtype) -> KernelInputs:
        pool = self.pool
        return KernelInputs(True, q_dtype, pool.dtype, self.cfg.num_heads, self.kv_lora_rank, self.kv_lora_rank,
                            pool.page_size, rope_dim=pool.qk_rope_head_dim)

    def _store(self, k, v, layer, forward_batch) -> None:
        self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k.view(-1, 1, k.shape[-1]), v,
                                k_scale=getattr(layer, "k_scale", None))

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """q [B, H, R+Dr]; k [B, 1, R+Dr]; v [B, 1, R] -> [B, H/N * R] (value exchange:
        kwargs w_uv [H, R, Dv] -> [B, H/N * Dv])."""
        w_uv = self._value_projection(kwargs)
        self._decode_ready(forward_batch)
        if save_kv_cache and k is not None:
            self._store(k, v, layer, forward_batch)
        q3 = q.reshape(q.shape[0], self.cfg.num_heads, -1)
        rank_r = self.kv_lora_rank
        k_scale, v_scale = self.kv_scales(layer)
        out = self.helix.forward_mla(q3[..., :rank_r].contiguous(), q3[..., rank_r:].contiguous(),
                                     self.pool.get_paged_kv(layer.layer_id), layer.scaling,
                                     w_uv=w_uv, k_scale=k_scale, v_scale=v_scale)
        return out.reshape(out.shape[0], -1)

    def _value_projection(self, kwargs):
        """w_uv (W_UV of all H heads, [H, R, Dv]) from the model path: required exactly when the
        layout's mla_exchange is "value"."""
        w_uv = kwargs.get("w_uv")
        if (w_uv is not None) != (self.cfg.mla_exchange == "value"):
            raise HelixConfigError(
                f"--helix-mla-exchange {self.cfg.mla_exchange}: the MLA model path "
                f"{'must pass' if w_uv is None else 'passed'} w_uv (W_UV of all heads); the "
                f"deepseek hooks (sglang_helix.srt.models.deepseek) pass it in value mode only")
        return w_uv

    def _extend_inputs(self, q, k, v, layer):
        q3 = q.reshape(q.shape[0], self.cfg.num_heads, -1)
        # the latent (values = its first R dims) rounded as stored: scaled by k_scale (kv_quant)
        k_new = self._as_stored(k.reshape(k.shape[0], 1, -1), getattr(layer, "k_scale", None))
        pages = self.pool.get_paged_kv(layer.layer_id).unsqueeze(2)  # [slots, P, 1, R+Dr]
        rank_r = self.kv_lora_rank
        return q3, k_new, k_new[..., :rank_r], pages, pages[..., :rank_r]


def find_helix_mla_backend(backend: Any = None) -> "HelixMLABackend":
    """The HelixMLABackend of this runner (direct, or inside a hybrid / TBO wrapper)."""
    if backend is None:
        from sglang.srt.model_executor.forward_context import get_attn_backend

        backend = get_attn_backend()
    seen = [backend]
    while seen:
        item = seen.pop()
        if isinstance(item, HelixMLABackend):
            return item
        for name in ("decode_backend", "prefill_backend", "primary"):
            child = getattr(item, name, None)
            if child is not None:
                seen.append(child)
    raise HelixConfigError(f"--enable-helix with an MLA model needs the '{BACKEND_NAME}' attention "
                        f"backend, got {type(backend).__name__}: declare attention_backend="
                        f"'{BACKEND_NAME}' (prefill and decode) in the plugin's resolution hook")


