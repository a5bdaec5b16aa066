"""Model and hardware specs as data.

Model numbers are the fields of each model's public Hugging Face `config.json` (field names in
the comments). Hardware numbers are vendor datasheet figures, per GPU, *dense* (the datasheets
quote FP4/FP8/BF16 tensor throughput with 2:4 sparsity; dense is half). Every assumption that is
not a datasheet figure is marked ASSUMPTION.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from ..errors import HelixError
from ..kv_size import KVShape

# Bytes per element of weights / KV cache at each precision. FP4 ignores block-scale overhead
# (NVFP4 adds one fp8 scale per 16 values, +6%): ASSUMPTION, as the paper quotes plain FP4.
PRECISION_BYTES = {"fp4": 0.5, "fp8": 1.0, "bf16": 2.0, "fp32": 4.0}
# Activations travel in bf16. The exchanged partial outputs are counted at bf16 too: the paper's
# design and `--helix-exchange-dtype activation`; the default fp32 exchange (docs/math.md
# section 4) sends about twice these exchange bytes, not modelled here.
ACT_BYTES = 2.0
LSE_BYTES = 4.0  # the LSE always travels as fp32 (docs/math.md section 4)


class SpecError(HelixError, ValueError):
    """A model or hardware spec that cannot be right; the message names the field."""


def _positive(obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(obj, name)
        low_ok = name in allow_zero
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            value == 0 and not low_ok
        ):
            raise SpecError(f"{type(obj).__name__}.{name} must be > 0{' or 0' if low_ok else ''}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only model: attention (MLA or GQA) + dense FFN and/or MoE layers."""

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

    def __post_init__(self) -> None:
        _positive(self, ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "vocab"))
        _positive(self, ("num_dense_layers", "num_experts", "top_k", "num_shared_experts"),
                  allow_zero=("num_dense_layers", "num_experts", "top_k", "num_shared_experts"))
        if self.num_heads % self.num_kv_heads:
            raise SpecError(f"{self.name}: num_heads {self.num_heads} not a multiple of num_kv_heads")
        if self.mla and (self.num_kv_heads != 1 or self.kv_lora_rank <= 0 or self.v_head_dim <= 0):
            raise SpecError(f"{self.name}: MLA needs num_kv_heads=1, kv_lora_rank > 0, v_head_dim > 0")
        if self.num_dense_layers > self.num_layers:
            raise SpecError(f"{self.name}: num_dense_layers > num_layers")
        if self.is_moe and not (0 < self.top_k <= self.num_experts and self.moe_intermediate > 0):
            raise SpecError(f"{self.name}: MoE needs 0 < top_k <= num_experts and moe_intermediate > 0")
        if self.num_dense_layers and self.dense_intermediate <= 0:
            raise SpecError(f"{self.name}: dense layers need dense_intermediate > 0")
        if not self.is_moe and self.num_dense_layers != self.num_layers:
            raise SpecError(f"{self.name}: a model without experts has only dense layers")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    # ---- attention geometry (decode; MLA in the absorbed latent form) -------------------------
    @property
    def kv_shape(self) -> KVShape:
        """The per-token KV row (sglang_helix.kv_size): MLA latent + rope, or GQA K and V heads."""
        if self.mla:
            return KVShape.mla_latent(self.kv_lora_rank, self.qk_rope_dim, self.num_layers)
        return KVShape.gqa(self.num_kv_heads, self.head_dim, layers=self.num_layers)

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
        """Per-head value length attention outputs (absorbed MLA: the latent, exchanged pre-W_UV)."""
        return self.kv_lora_rank if self.mla else self.head_dim

    # ---- parameter groups per layer (counts, not bytes) ---------------------------------------
    @property
    def attn_shared_params(self) -> int:
        """Input projections every attention rank needs whole (MLA: q_a and kv_a down-projections)."""
        if self.mla:
            return self.hidden * self.q_lora_rank + self.hidden * (self.kv_lora_rank + self.qk_rope_dim)
        return 0

    @property
    def attn_q_params(self) -> int:
        """Per-query-head input projections (split by heads). MLA: q_b plus the absorbed W_UK."""
        if self.mla:
            nope = self.head_dim
            return self.num_heads * (self.q_lora_rank * (nope + self.qk_rope_dim) + self.kv_lora_rank * nope)
        return self.hidden * self.num_heads * self.head_dim

    @property
    def attn_kv_params(self) -> int:
        """GQA K and V projections (split by KV head); 0 for MLA (kv_a is in attn_shared_params)."""
        return 0 if self.mla else 2 * self.hidden * self.num_kv_heads * self.head_dim

    @property
    def attn_out_params(self) -> int:
        """Per-head output side: o_proj (MLA also W_UV), split by heads."""
        if self.mla:
            return self.num_heads * self.v_head_dim * (self.kv_lora_rank + self.hidden)
        return self.num_heads * self.head_dim * self.hidden

    @property
    def attn_params(self) -> int:
        return self.attn_shared_params + self.attn_q_params + self.attn_kv_params + self.attn_out_params

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
        moe = self.num_experts * self.expert_params + self.num_shared_experts * self.expert_params
        per_dense = self.attn_params + self.dense_ffn_params
        per_moe = self.attn_params + moe + self.router_params
        return self.num_dense_layers * per_dense + self.num_moe_layers * per_moe + 2 * self.vocab * self.hidden


# Public config.json values, field names as in the config.
MODELS: dict[str, ModelSpec] = {
    # deepseek-ai/DeepSeek-R1 (= DeepSeek-V3 architecture): num_hidden_layers 61, hidden_size 7168,
    # num_attention_heads 128, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
    # v_head_dim 128, q_lora_rank 1536, intermediate_size 18432, first_k_dense_replace 3,
    # n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048,
    # vocab_size 129280.
    "deepseek-r1": ModelSpec(
        "deepseek-r1", "deepseek-ai/DeepSeek-R1", "DeepseekV3ForCausalLM", 61, 7168, 128, 1, 128, 129280,
        mla=True, kv_lora_rank=512, qk_rope_dim=64, q_lora_rank=1536, v_head_dim=128,
        dense_intermediate=18432, num_dense_layers=3, num_experts=256, top_k=8, num_shared_experts=1,
        moe_intermediate=2048,
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
    # moonshotai/Kimi-K2-Instruct (DeepseekV3ForCausalLM): num_hidden_layers 61, hidden_size 7168,
    # num_attention_heads 64, kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
    # v_head_dim 128, q_lora_rank 1536, intermediate_size 18432, first_k_dense_replace 1,
    # n_routed_experts 384, num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048,
    # vocab_size 163840.
    "kimi-k2": ModelSpec(
        "kimi-k2", "moonshotai/Kimi-K2-Instruct", "DeepseekV3ForCausalLM", 61, 7168, 64, 1, 128, 163840,
        mla=True, kv_lora_rank=512, qk_rope_dim=64, q_lora_rank=1536, v_head_dim=128,
        dense_intermediate=18432, num_dense_layers=1, num_experts=384, top_k=8, num_shared_experts=1,
        moe_intermediate=2048,
    ),
}
MODEL_ALIASES = {"deepseek-v3": "deepseek-r1", "llama-3.1-405b": "llama-405b", "llama-3-70b": "llama-70b"}


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (per-GPU figures) and the links between accelerators.

    flops: dense FLOP/s per precision; a precision the chip cannot compute natively is absent.
    link_bw: bytes/s per direction per GPU inside the scale-up domain (NVLink).
    link_latency: seconds per collective step inside the domain (ASSUMPTION for GPUs, see HARDWARE).
    scaleout_bw / scaleout_latency: the same beyond `domain_size` GPUs (one NIC per GPU).
    mem_fraction: share of HBM usable for weights + KV (the rest: activations, workspace, graphs).
    attn_precision: if set, attention math runs at this precision's rate whatever the KV precision
        (the CPU torch path upcasts to fp32).
    """

    name: str
    flops: dict = field(hash=False)
    hbm_bw: float
    hbm_capacity: float
    link_bw: float
    link_latency: float
    domain_size: int
    scaleout_bw: float
    scaleout_latency: float
    mem_fraction: float = 0.9
    attn_precision: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        _positive(self, ("hbm_bw", "hbm_capacity", "link_bw", "domain_size", "scaleout_bw"))
        _positive(self, ("link_latency", "scaleout_latency"), allow_zero=("link_latency", "scaleout_latency"))
        if not 0 < self.mem_fraction <= 1:
            raise SpecError(f"{self.name}: mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if not self.flops:
            raise SpecError(f"{self.name}: flops needs at least one precision")
        for prec, rate in self.flops.items():
            if prec not in PRECISION_BYTES or not rate > 0:
                raise SpecError(f"{self.name}: flops[{prec!r}] = {rate!r} (precision or rate invalid)")
        if self.attn_precision is not None and self.attn_precision not in self.flops:
            raise SpecError(f"{self.name}: attn_precision {self.attn_precision!r} has no flops entry")

    def flop_rate(self, precision: str) -> float:
        """Dense FLOP/s at `precision`; SpecError if the chip has no such tensor path."""
        if precision not in self.flops:
            raise SpecError(
                f"{self.name} has no {precision} compute (has {', '.join(sorted(self.flops))}); "
                f"pick --precision {' or '.join(sorted(p for p in self.flops if p != 'fp32'))}"
            )
        return self.flops[precision]

    def link(self, group: int) -> tuple[float, float]:
        """(bandwidth bytes/s per direction, latency s per step) for a group of `group` GPUs."""
        if group <= self.domain_size:
            return self.link_bw, self.link_latency
        return self.scaleout_bw, self.scaleout_latency

    @property
    def usable_memory(self) -> float:
        return self.hbm_capacity * self.mem_fraction


_T, _G, _US = 1e12, 1e9, 1e-6
# ASSUMPTION (all GPUs): one collective step inside the NVLink domain costs 1 us (NVLink +
# switch hop + synchronisation, small messages, CUDA graphs, no launch overhead); beyond the
# domain 5 us per step over 400 Gb/s (50 GB/s) InfiniBand/ConnectX-7 NICs, one per GPU.
HARDWARE: dict[str, HardwareSpec] = {
    # GB200 NVL72 datasheet (per rack / 72 GPUs): FP4 1,440 PF sparse -> 10 PF dense per GPU;
    # FP8 720 PF sparse -> 5 PF dense; BF16 360 PF sparse -> 2.5 PF dense; HBM3e 576 TB/s -> 8 TB/s
    # (the paper's 8000 GB/s); 13.4 TB HBM -> 186 GB; NVLink 5 130 TB/s -> 1.8 TB/s bidirectional
    # = 900 GB/s per direction; one NVLink domain of 72 GPUs.
    "gb200": HardwareSpec("gb200", {"fp4": 10e15, "fp8": 5e15, "bf16": 2.5e15}, 8 * _T, 186 * _G,
                          900 * _G, 1 * _US, 72, 50 * _G, 5 * _US, source="GB200 NVL72 datasheet"),
    # HGX B200 datasheet (8 GPUs): FP4 144 PF sparse -> 9 PF dense per GPU; FP8 72 PF sparse ->
    # 4.5 PF; BF16 36 PF sparse -> 2.25 PF; 8 TB/s HBM3e; 1.44 TB -> 180 GB; NVLink 5 1.8 TB/s
    # bidirectional; domain 8.
    "b200": HardwareSpec("b200", {"fp4": 9e15, "fp8": 4.5e15, "bf16": 2.25e15}, 8 * _T, 180 * _G,
                         900 * _G, 1 * _US, 8, 50 * _G, 5 * _US, source="HGX B200 datasheet"),
    # H200 SXM datasheet: FP8 3,958 TF sparse -> 1,979 dense; BF16 1,979 sparse -> 989 dense; no FP4;
    # 4.8 TB/s HBM3e, 141 GB; NVLink 4 900 GB/s bidirectional = 450 GB/s per direction; domain 8.
    "h200": HardwareSpec("h200", {"fp8": 1979 * _T, "bf16": 989 * _T}, 4.8 * _T, 141 * _G,
                         450 * _G, 1 * _US, 8, 50 * _G, 5 * _US, source="H200 SXM datasheet"),
    # H100 SXM datasheet: FP8 1,979 TF dense; BF16 989 TF dense; no FP4; 3.35 TB/s HBM3, 80 GB;
    # NVLink 4 450 GB/s per direction; domain 8.
    "h100": HardwareSpec("h100", {"fp8": 1979 * _T, "bf16": 989 * _T}, 3.35 * _T, 80 * _G,
                         450 * _G, 1 * _US, 8, 50 * _G, 5 * _US, source="H100 SXM datasheet"),
}
HARDWARE_CHOICES = tuple(HARDWARE) + ("cpu",)


def get_model(name: str) -> ModelSpec:
    """Model spec by name or alias; SpecError listing the choices otherwise."""
    key = MODEL_ALIASES.get(name, name)
    if key not in MODELS:
        raise SpecError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[key]


def get_hardware(name: str) -> HardwareSpec:
    """Hardware spec by name (datasheet figures). "cpu" is measured, not specified: use
    sglang_helix.perf.probe.cpu_hardware()."""
    if name == "cpu":
        raise SpecError("hardware 'cpu' is measured on this machine: call "
                        "sglang_helix.perf.probe.cpu_hardware()")
    if name not in HARDWARE:
        raise SpecError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE_CHOICES)}")
    return HARDWARE[name]


def log2_steps(group: int) -> int:
    """ceil(log2(group)) collective steps for tree/recursive-doubling algorithms (0 for 1 GPU)."""
    return 0 if group <= 1 else math.ceil(math.log2(group))
