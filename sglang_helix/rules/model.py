"""The model a launch serves: `ModelInfo` (from its HF config), the architectures with a Helix
path, and the checkpoint weight dtypes the Helix MLA path serves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .refusal import refuse

MLA_ARCHITECTURES = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"})
# Exactly the architectures whose attention class sglang_helix.srt.models.gqa hooks
# (GQA_ATTENTION_CLASSES there; a test keeps the two equal). MistralForCausalLM is
# SGLang's LlamaForCausalLM subclass, so it builds the hooked LlamaAttention.
GQA_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
# Weight dtypes the Helix MLA path replicates and applies (srt.models.deepseek): unquantized as
# they are; fp8 (e4m3) through SGLang's own fp8 linear method and its W_UK/W_UV conversion; fp4 as
# NVFP4 checkpoints are exported (ModelOpt: the MLA projections q_a/q_b/kv_a/kv_b stay bf16, which
# Helix replicates as they are; o_proj and the MLPs / experts are NVFP4 and stay as SGLang shards
# them). An NVFP4 q projection or kv_b_proj is refused at weight load (srt.models.deepseek).
UNQUANTIZED_WEIGHT_DTYPES = frozenset({"bf16", "fp16", "fp32"})
HELIX_MLA_WEIGHT_DTYPES = UNQUANTIZED_WEIGHT_DTYPES | {"fp8", "fp4"}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  "float": "fp32", "float8_e4m3fn": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8",
                  "nvfp4": "fp4"}


@dataclass(frozen=True)
class ModelInfo:
    """What Helix needs to know about a model, from its HF config.json (no weights)."""

    architecture: str
    num_heads: int
    num_kv_heads: int
    is_mla: bool
    num_experts: int = 0  # routed experts of an MoE model; 0: dense, or not known

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        """DeepSeek-style MLA is recognised by `kv_lora_rank`; it has one latent KV head."""
        architectures = config.get("architectures") or ["<missing architectures>"]
        num_heads = int(config["num_attention_heads"])
        is_mla = config.get("kv_lora_rank") is not None
        kv_heads = 1 if is_mla else int(config.get("num_key_value_heads") or num_heads)
        experts = int(config.get("n_routed_experts") or config.get("num_local_experts") or 0)
        return cls(str(architectures[0]), num_heads, kv_heads, is_mla, experts)

    @property
    def kind(self) -> str:
        return "MLA" if self.is_mla else "GQA/MHA"


def check_architecture(model: ModelInfo) -> None:
    """Refuse an architecture whose attention layer has no Helix hook."""
    known = MLA_ARCHITECTURES if model.is_mla else GQA_ARCHITECTURES
    if model.architecture not in known:
        supported = ", ".join(sorted(MLA_ARCHITECTURES | GQA_ARCHITECTURES))
        refuse(f"--enable-helix: architecture {model.architecture} ({model.kind}) has no Helix "
               f"path; supported: {supported}. Drop --enable-helix for this model")


def weight_dtype_name(dtype: Any) -> str:
    """'bf16' for torch.bfloat16 / 'bfloat16' / 'bf16' (and fp16, fp32 likewise; 'fp8' for e4m3,
    'fp4' for 'nvfp4'); other dtypes (int8, mxfp4, ...) come back as given, lower case, without a
    'torch.' prefix."""
    name = str(dtype).lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def is_unquantized_weight(dtype: Any) -> bool:
    """True for the weight dtypes the Helix MLA path replicates and bmm's as is (bf16/fp16/fp32)."""
    return weight_dtype_name(dtype) in UNQUANTIZED_WEIGHT_DTYPES


def is_helix_mla_weight(dtype: Any) -> bool:
    """True for the MLA checkpoint dtypes Helix serves: bf16/fp16/fp32, fp8 (e4m3), fp4 (NVFP4)."""
    return weight_dtype_name(dtype) in HELIX_MLA_WEIGHT_DTYPES


def check_mla_weights(model: ModelInfo, weights: Any) -> None:
    """Refuse an MLA checkpoint quantized other than fp8 or NVFP4: every Helix MLA rank gathers the
    q projection and W_UK of all heads (fp8 ones with their scales; an NVFP4 checkpoint keeps
    them bf16) and applies them with SGLang's own linear method (srt.models.deepseek checks the
    loaded modules again at weight load). `weights`: the checkpoint's dtype ('bf16', 'fp8',
    torch.float8_e4m3fn, 'fp4', 'nvfp4', 'int8', ...) or None (unknown: left to the weight-load
    check)."""
    if not model.is_mla or weights is None or is_helix_mla_weight(weights):
        return
    refuse(f"--enable-helix with {weight_dtype_name(weights)} weights ({model.architecture}): the "
           "Helix MLA path serves bf16/fp16/fp32, fp8 (e4m3, block or per-tensor scales) and "
           "NVFP4 (ModelOpt, MLA projections bf16) checkpoints; serve one of those or drop "
           "--enable-helix")
