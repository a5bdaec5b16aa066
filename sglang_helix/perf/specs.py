"""Model specs as data: the fields of each model's public Hugging Face `config.json`.

Every number is a config field (named in the comments); every assumption that is not one is
marked ASSUMPTION. The KV row of a model is a `kv_size.KVShape` (the one KV arithmetic): this
module never counts KV bytes itself. Hardware specs are in `hardware.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HelixError
from ..kv_size import KVShape

# Bytes per element at each precision. FP4 ignores the block scales (NVFP4 adds one fp8 scale per
# 16 values, +6%): ASSUMPTION, as the Helix paper quotes plain FP4.
PRECISION_BYTES = {"fp4": 0.5, "fp8": 1.0, "bf16": 2.0, "fp32": 4.0}
ACT_BYTES = 2.0  # activations (and the "activation" exchange dtype) travel in bf16
LSE_BYTES = 4.0  # an LSE always travels as fp32 (docs/math.md section 4)
STATE_BYTES = 4.0  # linear-attention (Gated DeltaNet) recurrent state: fp32 in SGLang


class SpecError(HelixError, ValueError):
    """A model or hardware spec that cannot be right; the message names the field."""


def check_numbers(obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    """SpecError unless every named field is a number > 0 (or >= 0 for `allow_zero`)."""
    for name in names:
        value = getattr(obj, name)
        low_ok = name in allow_zero
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            value == 0 and not low_ok
        ):
            raise SpecError(f"{type(obj).__name__}.{name} must be > 0{' or 0' if low_ok else ''}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only model: attention (MLA or GQA, optionally hybrid with linear-attention
    layers that keep a fixed recurrent state instead of a KV cache) + dense FFN and/or MoE."""

    name: str
    hf_id: str
    architecture: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int  # 1 for MLA (one latent head)
    head_dim: int  # GQA head dim; MLA: qk_nope_head_dim
    vocab: int
    mla: bool = False
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    q_lora_rank: int = 0
    v_head_dim: int = 0  # MLA only (GQA uses head_dim)
    dense_intermediate: int = 0
    num_dense_layers: int = 0  # the first layers are dense (first_k_dense_replace); all, if no MoE
    num_experts: int = 0
    top_k: int = 0
    num_shared_experts: int = 0
    moe_intermediate: int = 0
    gated_attention: bool = False  # attn_output_gate: q_proj also produces a per-head gate
    linear_layers: int = 0  # layers with linear attention (no KV cache), e.g. Gated DeltaNet
    linear_params: int = 0  # weights of one linear-attention layer
    linear_state: int = 0  # recurrent-state elements of one request in one linear layer
    checkpoint: str = "bf16"  # dtype of the upstream checkpoint's weights

    def __post_init__(self) -> None:
        check_numbers(self, ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "vocab"))
        check_numbers(self, ("num_dense_layers", "num_experts", "top_k", "num_shared_experts",
                             "linear_layers", "linear_params", "linear_state"),
                      allow_zero=("num_dense_layers", "num_experts", "top_k", "num_shared_experts",
                                  "linear_layers", "linear_params", "linear_state"))
        if self.num_heads % self.num_kv_heads:
            raise SpecError(f"{self.name}: num_heads {self.num_heads} not a multiple of num_kv_heads")
        if self.mla and (self.num_kv_heads != 1 or self.kv_lora_rank <= 0 or self.v_head_dim <= 0):
            raise SpecError(f"{self.name}: MLA needs num_kv_heads=1, kv_lora_rank > 0, v_head_dim > 0")
        if self.num_dense_layers > self.num_layers or self.linear_layers >= self.num_layers:
            raise SpecError(f"{self.name}: num_dense_layers / linear_layers exceed num_layers")
        if bool(self.linear_layers) != bool(self.linear_params and self.linear_state):
            raise SpecError(f"{self.name}: linear layers need linear_params and linear_state")
        if self.is_moe and not (0 < self.top_k <= self.num_experts and self.moe_intermediate > 0):
            raise SpecError(f"{self.name}: MoE needs 0 < top_k <= num_experts and moe_intermediate > 0")
        if self.num_dense_layers and self.dense_intermediate <= 0:
            raise SpecError(f"{self.name}: dense layers need dense_intermediate > 0")
        if not self.is_moe and self.num_dense_layers != self.num_layers:
            raise SpecError(f"{self.name}: a model without experts has only dense layers")
        if self.checkpoint not in PRECISION_BYTES:
            raise SpecError(f"{self.name}: checkpoint dtype {self.checkpoint!r} unknown")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def attention_layers(self) -> int:
        """Layers with softmax attention over a KV cache (all but the linear-attention ones)."""
        return self.num_layers - self.linear_layers

    # ---- attention geometry (decode; MLA in the absorbed latent form) -------------------------
    @property
    def kv_shape(self) -> KVShape:
        """The per-token KV row (sglang_helix.kv_size) over the layers that keep a KV cache."""
        if self.mla:
            return KVShape.mla_latent(self.kv_lora_rank, self.qk_rope_dim, self.attention_layers)
        return KVShape.gqa(self.num_kv_heads, self.head_dim, layers=self.attention_layers)

    @property
    def kv_elems_per_token(self) -> int:
        """Cached elements per token per layer for the whole model (all KV heads)."""
        return self.kv_shape.elems_per_token()

    @property
    def qk_dim(self) -> int:
        """Per-head dot-product length of q.k (absorbed MLA: latent + rope)."""
        return self.kv_lora_rank + self.qk_rope_dim if self.mla else self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head width attention outputs (absorbed MLA: the latent, before W_UV)."""
        return self.kv_lora_rank if self.mla else self.head_dim

    # ---- parameter groups per attention layer (counts, not bytes) -----------------------------
    @property
    def attn_shared_params(self) -> int:
        """Input projections every attention rank holds whole (MLA: q_a and kv_a)."""
        if self.mla:
            return self.hidden * self.q_lora_rank + self.hidden * (self.kv_lora_rank + self.qk_rope_dim)
        return 0

    @property
    def q_params_per_head(self) -> int:
        """Query-side projection weights of one head. MLA: q_b plus the absorbed W_UK; a gated
        GQA head also projects its output gate."""
        if self.mla:
            nope = self.head_dim
            return self.q_lora_rank * (nope + self.qk_rope_dim) + self.kv_lora_rank * nope
        return self.hidden * self.head_dim * (2 if self.gated_attention else 1)

    @property
    def attn_q_params(self) -> int:
        return self.num_heads * self.q_params_per_head

    @property
    def kv_params_per_head(self) -> int:
        """GQA K and V projection weights of one KV head; 0 for MLA (kv_a is shared)."""
        return 0 if self.mla else 2 * self.hidden * self.head_dim

    @property
    def w_uv_per_head(self) -> int:
        """MLA W_UV of one head (R x Dv); 0 for GQA."""
        return self.kv_lora_rank * self.v_head_dim if self.mla else 0

    @property
    def out_params_per_head(self) -> int:
        """o_proj of one head (MLA: W_UV + o_proj)."""
        width = self.v_head_dim if self.mla else self.head_dim
        return self.w_uv_per_head + width * self.hidden

    @property
    def attn_params(self) -> int:
        return (self.attn_shared_params + self.attn_q_params + self.num_kv_heads * self.kv_params_per_head
                + self.num_heads * self.out_params_per_head)

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.dense_intermediate  # gate, up, down

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def router_params(self) -> int:
        return self.hidden * self.num_experts

    @property
    def total_params(self) -> int:
        """All weights (embedding and LM head untied, as in every model here)."""
        moe = (self.num_experts + self.num_shared_experts) * self.expert_params + self.router_params
        mixers = self.attention_layers * self.attn_params + self.linear_layers * self.linear_params
        return (mixers + self.num_dense_layers * self.dense_ffn_params + self.num_moe_layers * moe
                + 2 * self.vocab * self.hidden)


def _gdn(hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int) -> tuple[int, int]:
    """(weights, recurrent-state elements per request) of one Gated DeltaNet layer: q, k, v, z
    and the a/b gates in, o out; state v_heads x k_dim x v_dim (SGLang's mamba-style pool)."""
    qk, v = k_heads * k_dim, v_heads * v_dim
    return hidden * (2 * qk + 2 * v + 2 * v_heads) + v * hidden, v_heads * k_dim * v_dim


_QWEN35_GDN = _gdn(4096, 16, 64, 128, 128)

# Public config.json values, field names as in the config.
MODELS: dict[str, ModelSpec] = {
    # deepseek-ai/DeepSeek-R1 (= DeepSeek-V3 architecture): num_hidden_layers 61, hidden_size 7168,
    # num_attention_heads 128, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
    # v_head_dim 128, q_lora_rank 1536, intermediate_size 18432, first_k_dense_replace 3,
    # n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048,
    # vocab_size 129280; quantization_config fp8 (block 128).
    "deepseek-r1": ModelSpec(
        "deepseek-r1", "deepseek-ai/DeepSeek-R1", "DeepseekV3ForCausalLM", 61, 7168, 128, 1, 128, 129280,
        mla=True, kv_lora_rank=512, qk_rope_dim=64, q_lora_rank=1536, v_head_dim=128,
        dense_intermediate=18432, num_dense_layers=3, num_experts=256, top_k=8, num_shared_experts=1,
        moe_intermediate=2048, checkpoint="fp8",
    ),
    # meta-llama/Llama-3.1-405B-Instruct: num_hidden_layers 126, hidden_size 16384,
    # num_attention_heads 128, num_key_value_heads 8, head_dim 128, intermediate_size 53248,
    # vocab_size 128256.
    "llama-405b": ModelSpec(
        "llama-405b", "meta-llama/Llama-3.1-405B-Instruct", "LlamaForCausalLM", 126, 16384, 128, 8, 128,
        128256, dense_intermediate=53248, num_dense_layers=126,
    ),
    # meta-llama/Meta-Llama-3-70B-Instruct: num_hidden_layers 80, hidden_size 8192,
    # num_attention_heads 64, num_key_value_heads 8, (head_dim 128), intermediate_size 28672,
    # vocab_size 128256.
    "llama-70b": ModelSpec(
        "llama-70b", "meta-llama/Meta-Llama-3-70B-Instruct", "LlamaForCausalLM", 80, 8192, 64, 8, 128,
        128256, dense_intermediate=28672, num_dense_layers=80,
    ),
    # Qwen/Qwen3-235B-A22B: num_hidden_layers 94, hidden_size 4096, num_attention_heads 64,
    # num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8,
    # moe_intermediate_size 1536, mlp_only_layers [] (every layer MoE), no shared expert,
    # vocab_size 151936.
    "qwen3-235b": ModelSpec(
        "qwen3-235b", "Qwen/Qwen3-235B-A22B", "Qwen3MoeForCausalLM", 94, 4096, 64, 4, 128, 151936,
        num_experts=128, top_k=8, moe_intermediate=1536,
    ),
    # Qwen/Qwen3.5-397B-A17B (text_config): num_hidden_layers 60, full_attention_interval 4 (15
    # gated-attention layers, 45 Gated DeltaNet layers), hidden_size 4096, num_attention_heads 32,
    # num_key_value_heads 2, head_dim 256, attn_output_gate true, linear_num_key_heads 16,
    # linear_num_value_heads 64, linear_key/value_head_dim 128, num_experts 512,
    # num_experts_per_tok 10, moe_intermediate_size 1024, shared_expert_intermediate_size 1024,
    # vocab_size 248320.
    "qwen3.5-397b": ModelSpec(
        "qwen3.5-397b", "Qwen/Qwen3.5-397B-A17B", "Qwen3_5MoeForConditionalGeneration", 60, 4096, 32, 2,
        256, 248320, num_experts=512, top_k=10, num_shared_experts=1, moe_intermediate=1024,
        gated_attention=True, linear_layers=45, linear_params=_QWEN35_GDN[0], linear_state=_QWEN35_GDN[1],
    ),
    # moonshotai/Kimi-K2-Instruct (DeepseekV3ForCausalLM; Kimi-K2.5/K2.6 keep this text model):
    # num_hidden_layers 61, hidden_size 7168, num_attention_heads 64, kv_lora_rank 512,
    # qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128, q_lora_rank 1536,
    # intermediate_size 18432, first_k_dense_replace 1, n_routed_experts 384,
    # num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048, vocab_size 163840;
    # quantization_config fp8 (block 128).
    "kimi-k2": ModelSpec(
        "kimi-k2", "moonshotai/Kimi-K2-Instruct", "DeepseekV3ForCausalLM", 61, 7168, 64, 1, 128, 163840,
        mla=True, kv_lora_rank=512, qk_rope_dim=64, q_lora_rank=1536, v_head_dim=128,
        dense_intermediate=18432, num_dense_layers=1, num_experts=384, top_k=8, num_shared_experts=1,
        moe_intermediate=2048, checkpoint="fp8",
    ),
}
MODEL_ALIASES = {"deepseek-v3": "deepseek-r1", "llama-3.1-405b": "llama-405b", "llama-3-70b": "llama-70b",
                 "qwen3.5": "qwen3.5-397b", "kimi-k2.6": "kimi-k2"}


def get_model(name: str) -> ModelSpec:
    """Model spec by name or alias; SpecError listing the choices otherwise."""
    key = MODEL_ALIASES.get(name, name)
    if key not in MODELS:
        raise SpecError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[key]
