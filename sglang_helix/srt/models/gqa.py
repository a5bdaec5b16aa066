"""TPA-sharded GQA attention layers for SGLang 0.5.23 (Llama/Mistral, Qwen2, Qwen3).

One AROUND hook on the __init__ of every class in GQA_ATTENTION_CLASSES (one row each in
srt.hook_table, all with `_around_gqa_attention_init`): under Helix the layer of
global rank g = tpa_rank * KVP + kvp_rank computes
    q for its TPA group's H/TPA heads and k/v for K/TPA KV heads
      -> qkv_proj rebuilt as QKVParallelLinear sharded TPA ways (SGLang's
         ReplicatedParallelGroup(<the stock qkv_proj's group: "tp", Qwen3 "attn_tp">, KVP):
         rank_in_group = g // KVP = tpa_rank, world = TPA; bias kept as the stock layer had it),
         so weight loading shards Q/K/V TPA ways with SGLang's own loaders;
    RadixAttention with H/TPA query heads and K/TPA KV heads (Qwen3's per-head q/k RMSNorm has
      one [D] weight shared by all heads, so it runs unchanged on H/TPA and K/TPA heads);
    the backend returns [T, H/N * Dv] (heads [g*H/N, (g+1)*H/N)) for the unchanged o_proj
      (RowParallelLinear, TP = N).
With KVP == 1 the stock TP = N sharding already is TPA-way, so nothing is rebuilt. Without a
HelixConfig every hook calls straight through (Helix off is byte-identical).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from ...config import HelixConfig
from ...errors import HelixError
from .. import state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GqaAttentionClass:
    """One SGLang GQA attention class re-shaped for Helix by the AROUND hook on its __init__.

    name: the class name (its `__init__` is a row of srt.hook_table); architectures: the HF
    architectures whose SGLang model builds it (their union is rules.model.GQA_ARCHITECTURES, the
    architectures the launch rules let through).
    """

    name: str
    architectures: tuple[str, ...]


# SGLang 0.5.23: MistralForCausalLM is `class MistralForCausalLM(LlamaForCausalLM): pass`.
GQA_ATTENTION_CLASSES = (
    GqaAttentionClass("LlamaAttention", ("LlamaForCausalLM", "MistralForCausalLM")),
    GqaAttentionClass("Qwen2Attention", ("Qwen2ForCausalLM",)),
    GqaAttentionClass("Qwen3Attention", ("Qwen3ForCausalLM",)),
)


class HelixModelError(HelixError):
    """The model cannot run under Helix as built; the message names the fix."""


# ---------------------------------------------------------------- attention layer


def stock_qkv_group(qkv_proj: Any) -> str:
    """The TP group the stock qkv_proj is sharded over: "tp" (Llama, Qwen2) or "attn_tp" (Qwen3)."""
    group = getattr(qkv_proj, "parallel_group", None) or "tp"
    if group not in ("tp", "attn_tp"):
        raise HelixModelError(f"qkv_proj is built with parallel_group={group!r}; Helix can shard "
                              "only a \"tp\" / \"attn_tp\" QKV projection TPA ways. Drop "
                              "--enable-helix for this model")
    return group


def _tpa_qkv(attn: Any, cfg: HelixConfig, bias: bool, quant_config: Any, prefix: str,
             input_size: int | None = None):
    """QKVParallelLinear holding this rank's TPA group's Q (H/TPA) and K/V (K/TPA) heads (input:
    the layer's hidden size unless given, e.g. an EAGLE-3 draft's 2 x hidden)."""
    from sglang.srt.layers.linear import QKVParallelLinear, ReplicatedParallelGroup

    return QKVParallelLinear(
        input_size or attn.hidden_size, attn.head_dim, attn.total_num_heads, attn.total_num_kv_heads,
        bias=bias, quant_config=quant_config, prefix=prefix,
        parallel_group=ReplicatedParallelGroup(stock_qkv_group(attn.qkv_proj), cfg.kvp),
    )


def apply_helix_heads(attn: Any, cfg: HelixConfig, *, bias: bool, quant_config: Any,
                      qkv_prefix: str) -> None:
    """Re-shape one GQA attention module (any of GQA_ATTENTION_CLASSES) for Helix, in place.

    After: attn.num_heads = H/TPA, attn.num_kv_heads = K/TPA, q_size/kv_size to match,
    qkv_proj -> [T, (H/TPA + 2 K/TPA) * D], attn.attn (RadixAttention) H/TPA and K/TPA heads.
    o_proj is left alone (TP = N over H/N heads).
    """
    if attn.total_num_heads != cfg.num_heads or attn.total_num_kv_heads != cfg.num_kv_heads:
        raise HelixModelError(f"layer has H={attn.total_num_heads}, K={attn.total_num_kv_heads} but the "
                              f"HelixConfig says H={cfg.num_heads}, K={cfg.num_kv_heads}")
    # An fp8 checkpoint gives RadixAttention SGLang's Fp8KVCacheMethod (per-layer k/v scales,
    # read only with an fp8 KV cache); the head counts below do not touch it.
    if cfg.kvp > 1:  # KVP == 1: TP = N = TPA sharding is already right
        attn.qkv_proj = _tpa_qkv(attn, cfg, bias, quant_config, qkv_prefix)
    attn.num_heads = cfg.heads_per_tpa
    attn.num_kv_heads = cfg.kv_heads_per_tpa
    attn.q_size = attn.num_heads * attn.head_dim
    attn.kv_size = attn.num_kv_heads * attn.head_dim
    radix = attn.attn
    radix.tp_q_head_num = cfg.heads_per_tpa
    radix.tp_k_head_num = radix.tp_v_head_num = cfg.kv_heads_per_tpa


def _around_gqa_attention_init(original: Callable, self: Any, *args: Any, **kwargs: Any) -> None:
    """The one hook for every GQA_ATTENTION_CLASSES __init__: stock init, then Helix heads.

    Reads only what all hooked classes share: the `quant_config` and `prefix` arguments, and the
    built module's head counts, head_dim, hidden_size, qkv_proj (bias, group) and attn."""
    original(self, *args, **kwargs)
    cfg = state.current_config()
    if cfg is None:
        return
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    bound.apply_defaults()
    prefix = bound.arguments.get("prefix", "") or ""
    apply_helix_heads(
        self, cfg, bias=self.qkv_proj.bias is not None,
        quant_config=bound.arguments.get("quant_config"),
        qkv_prefix=f"{prefix}.qkv_proj" if prefix else "qkv_proj",
    )


def _around_unaligned_cpu_tp(original: Callable, model_config: Any, *args: Any, **kwargs: Any):
    """SGLang's CPU engine pads KV heads up to --tp-size when K % TP != 0 (dummy heads). Under
    Helix attention is sharded TPA ways (K % TPA == 0, H % N == 0 are validated), so the real
    head counts are restored after SGLang's other CPU padding (vocab, intermediate) ran."""
    cfg = state.current_config()
    if cfg is None or cfg.mla:
        return original(model_config, *args, **kwargs)
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    out = original(model_config, *args, **kwargs)
    for config in {id(c): c for c in (out, out.hf_config, out.hf_text_config)}.values():
        for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(config, name):
                setattr(config, name, value)
    return out
