"""Model-side Helix glue for SGLang 0.5.23 (GQA), and the one module holding per-process state.

State (set once per scheduler process, read by the backend; nothing else is global):
    HelixRuntime(layout, rank, kvp_group) -- created by the AFTER hook on
    `parallel_state.initialize_model_parallel`, right after SGLang built its TP groups, on every
    rank in the same order (`create_kvp_groups` is collective). `runtime()` returns it.

Model side (one AROUND hook on the __init__ of every class in GQA_ATTENTION_CLASSES: Llama's,
Qwen2's and Qwen3's attention): under Helix the layer of global rank
g = tpa_rank * KVP + kvp_rank computes
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
Helix layout every hook calls straight through (Helix off is byte-identical).
"""

from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .config import HelixConfig
from .hooks import missing_hooks, register_once, wraps_hook
from .sglang_pool import LAYOUT_ATTR

logger = logging.getLogger(__name__)

INIT_MP_TARGET = "sglang.srt.distributed.parallel_state.initialize_model_parallel"
CPU_TP_PAD_TARGET = "sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp"


@dataclass(frozen=True)
class GqaAttentionClass:
    """One SGLang GQA attention class re-shaped for Helix by the AROUND hook on its __init__.

    path: "module.Class"; architectures: the HF architectures whose SGLang model builds it
    (their union is args.GQA_ARCHITECTURES, the architectures validation lets through).
    """

    path: str
    architectures: tuple[str, ...]

    @property
    def target(self) -> str:
        return f"{self.path}.__init__"


# SGLang 0.5.23: MistralForCausalLM is `class MistralForCausalLM(LlamaForCausalLM): pass`.
GQA_ATTENTION_CLASSES = (
    GqaAttentionClass("sglang.srt.models.llama.LlamaAttention",
                      ("LlamaForCausalLM", "MistralForCausalLM")),
    GqaAttentionClass("sglang.srt.models.qwen2.Qwen2Attention", ("Qwen2ForCausalLM",)),
    GqaAttentionClass("sglang.srt.models.qwen3.Qwen3Attention", ("Qwen3ForCausalLM",)),
)
GQA_ATTENTION_TARGETS = tuple(cls.target for cls in GQA_ATTENTION_CLASSES)


class HelixModelError(RuntimeError):
    """The model cannot run under Helix as built; the message names the fix."""


@dataclass
class HelixRuntime:
    """Per-process Helix state: layout, global attention rank g, this rank's KVP group."""

    layout: HelixConfig
    rank: int
    kvp_group: Any
    layers_built: int = 0


_RUNTIME: Optional[HelixRuntime] = None


def runtime() -> Optional[HelixRuntime]:
    """This process's HelixRuntime (None: Helix off, or groups not created yet)."""
    return _RUNTIME


def _reset_for_tests() -> None:
    global _RUNTIME
    _RUNTIME = None


def current_layout() -> Optional[HelixConfig]:
    """The HelixConfig on the published ServerArgs of this process (None: Helix off)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        server_args = get_server_args()
    except Exception:  # context not published (tools, unit tests): Helix is off here
        return None
    return getattr(server_args, LAYOUT_ATTR, None)


# ---------------------------------------------------------------- KVP groups


def init_runtime(layout: HelixConfig, rank: int, group_factory=None) -> HelixRuntime:
    """Create the KVP groups (collective on all N ranks) and store the runtime; once only."""
    global _RUNTIME
    from .sglang_backend import create_kvp_groups

    if _RUNTIME is not None:
        raise HelixModelError("Helix KVP groups were already created in this process")
    group = create_kvp_groups(layout, rank, group_factory)
    _RUNTIME = HelixRuntime(layout, rank, group)
    logger.info("sglang_helix: KVP groups ready on rank %d (KVP rank %d, TPA rank %d)",
                rank, layout.kvp_rank(rank), layout.tpa_rank(rank))
    return _RUNTIME


def _after_initialize_model_parallel(result: Any, *args: Any, **kwargs: Any) -> None:
    layout = current_layout()
    if layout is None or _RUNTIME is not None:
        return None
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.tp_size != layout.world_size or par.pp_size != 1:
        raise HelixModelError(f"--tp-size {par.tp_size} (pp {par.pp_size}) does not match Helix "
                              f"KVP x TPA = {layout.world_size}; set --tp-size {layout.world_size}")
    init_runtime(layout, par.tp_rank)
    return None


# ---------------------------------------------------------------- attention layer


def stock_qkv_group(qkv_proj: Any) -> str:
    """The TP group the stock qkv_proj is sharded over: "tp" (Llama, Qwen2) or "attn_tp" (Qwen3)."""
    group = getattr(qkv_proj, "parallel_group", None) or "tp"
    if group not in ("tp", "attn_tp"):
        raise HelixModelError(f"qkv_proj is built with parallel_group={group!r}; Helix can shard "
                              "only a \"tp\" / \"attn_tp\" QKV projection TPA ways. Drop "
                              "--enable-helix for this model")
    return group


def _tpa_qkv(attn: Any, layout: HelixConfig, bias: bool, quant_config: Any, prefix: str):
    """QKVParallelLinear holding this rank's TPA group's Q (H/TPA) and K/V (K/TPA) heads."""
    from sglang.srt.layers.linear import QKVParallelLinear, ReplicatedParallelGroup

    return QKVParallelLinear(
        attn.hidden_size, attn.head_dim, attn.total_num_heads, attn.total_num_kv_heads,
        bias=bias, quant_config=quant_config, prefix=prefix,
        parallel_group=ReplicatedParallelGroup(stock_qkv_group(attn.qkv_proj), layout.kvp),
    )


def apply_helix_heads(attn: Any, layout: HelixConfig, *, bias: bool, quant_config: Any,
                      qkv_prefix: str) -> None:
    """Re-shape one GQA attention module (any of GQA_ATTENTION_CLASSES) for Helix, in place.

    After: attn.num_heads = H/TPA, attn.num_kv_heads = K/TPA, q_size/kv_size to match,
    qkv_proj -> [T, (H/TPA + 2 K/TPA) * D], attn.attn (RadixAttention) H/TPA and K/TPA heads.
    o_proj is left alone (TP = N over H/N heads).
    """
    if attn.total_num_heads != layout.num_heads or attn.total_num_kv_heads != layout.num_kv_heads:
        raise HelixModelError(f"layer has H={attn.total_num_heads}, K={attn.total_num_kv_heads} but the "
                              f"Helix layout says H={layout.num_heads}, K={layout.num_kv_heads}")
    if getattr(attn.attn, "quant_method", None) is not None:
        raise HelixModelError("quantized attention (KV scales) is not supported with Helix; drop "
                              "the KV-cache quantization or --enable-helix")
    if layout.kvp > 1:  # KVP == 1: TP = N = TPA sharding is already right
        attn.qkv_proj = _tpa_qkv(attn, layout, bias, quant_config, qkv_prefix)
    attn.num_heads = layout.heads_per_tpa
    attn.num_kv_heads = layout.kv_heads_per_tpa
    attn.q_size = attn.num_heads * attn.head_dim
    attn.kv_size = attn.num_kv_heads * attn.head_dim
    radix = attn.attn
    radix.tp_q_head_num = layout.heads_per_tpa
    radix.tp_k_head_num = radix.tp_v_head_num = layout.kv_heads_per_tpa


def _around_gqa_attention_init(original: Callable, self: Any, *args: Any, **kwargs: Any) -> None:
    """The one hook for every GQA_ATTENTION_CLASSES __init__: stock init, then Helix heads.

    Reads only what all hooked classes share: the `quant_config` and `prefix` arguments, and the
    built module's head counts, head_dim, hidden_size, qkv_proj (bias, group) and attn."""
    original(self, *args, **kwargs)
    layout = current_layout()
    if layout is None:
        return
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    bound.apply_defaults()
    prefix = bound.arguments.get("prefix", "") or ""
    apply_helix_heads(
        self, layout, bias=self.qkv_proj.bias is not None,
        quant_config=bound.arguments.get("quant_config"),
        qkv_prefix=f"{prefix}.qkv_proj" if prefix else "qkv_proj",
    )
    if _RUNTIME is not None:
        _RUNTIME.layers_built += 1


def _around_unaligned_cpu_tp(original: Callable, model_config: Any, *args: Any, **kwargs: Any):
    """SGLang's CPU engine pads KV heads up to --tp-size when K % TP != 0 (dummy heads). Under
    Helix attention is sharded TPA ways (K % TPA == 0, H % N == 0 are validated), so the real
    head counts are restored after SGLang's other CPU padding (vocab, intermediate) ran."""
    layout = current_layout()
    if layout is None or layout.mla:
        return original(model_config, *args, **kwargs)
    heads, kv_heads = layout.num_heads, layout.num_kv_heads
    out = original(model_config, *args, **kwargs)
    for config in {id(c): c for c in (out, out.hf_config, out.hf_text_config)}.values():
        for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(config, name):
                setattr(config, name, value)
    return out


# ---------------------------------------------------------------- registration / liveness

MODEL_HOOKS = ((INIT_MP_TARGET, "AFTER", _after_initialize_model_parallel),
               (CPU_TP_PAD_TARGET, "AROUND", _around_unaligned_cpu_tp)) + tuple(
    (target, "AROUND", _around_gqa_attention_init) for target in GQA_ATTENTION_TARGETS)


def install_model_hooks() -> None:
    """Register the hooks above with SGLang's HookRegistry (idempotent; from plugin.register())."""
    for target, kind, hook in MODEL_HOOKS:
        register_once(target, hook, kind)


def model_hooks_live() -> list[str]:
    """Targets whose live attribute does not wrap our hook yet ([] when all are applied)."""
    missing = missing_hooks((target, hook) for target, _, hook in MODEL_HOOKS)
    bootstrap = sys.modules.get("sglang.srt.distributed.bootstrap")  # `from ... import` binding
    if bootstrap is not None and not wraps_hook(getattr(bootstrap, "initialize_model_parallel", None),
                                                _after_initialize_model_parallel):
        missing.append("sglang.srt.distributed.bootstrap.initialize_model_parallel")
    return missing
