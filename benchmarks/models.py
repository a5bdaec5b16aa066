"""Attention dimensions of real models, for the single-layer benchmark (from their public configs)."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_helix.kv_size import KVShape


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int  # 1 for MLA
    head_dim: int  # GQA head dim; MLA: kv_lora_rank (the latent value dim)
    rope_dim: int = 0  # MLA only: qk_rope_head_dim
    mla: bool = False
    v_head_dim: int = 0  # MLA only: W_UV's output width per head (bench_layer --mla-exchange)

    @property
    def kv_shape(self) -> KVShape:
        """The per-token KV row of every layer (sglang_helix.kv_size)."""
        if self.mla:
            return KVShape.mla_latent(self.head_dim, self.rope_dim, self.num_layers)
        return KVShape.gqa(self.num_kv_heads, self.head_dim, layers=self.num_layers)


MODELS = {
    # DeepSeek-V3 / R1: 61 layers, 128 heads, kv_lora_rank 512, qk_rope_head_dim 64
    # v_head_dim 128
    "deepseek-v3": AttentionSpec("deepseek-v3", 61, 128, 1, 512, 64, mla=True, v_head_dim=128),
    # DeepSeek-V3-Lite as TensorRT-LLM's benchmark uses it (DeepSeek-V2-Lite dims): 27 layers, 16 heads
    "deepseek-v3-lite": AttentionSpec("deepseek-v3-lite", 27, 16, 1, 512, 64, mla=True, v_head_dim=128),
    # Llama-3-70B: 80 layers, 64 query heads, 8 KV heads, head dim 128
    "llama-70b": AttentionSpec("llama-70b", 80, 64, 8, 128),
    # Gemma-2B: 18 layers, 8 query heads, 1 KV head (multi-query), head dim 256; plain TP > 1
    # replicates its single KV head, Helix KVP splits it by page
    "gemma-2b": AttentionSpec("gemma-2b", 18, 8, 1, 256),
}
