"""DeepSeek-V2/V3 MLA under Helix in SGLang 0.5.23: weight replication and the absorbed model path.

Layout (TPA = 1, KVP = N = --tp-size; docs/math.md): SGLang builds DeepseekV2AttentionMLA with
attention TP = N as usual, so q_b_proj (q_proj), kv_b_proj (w_kc / w_vc) and o_proj hold H/N
heads on rank g. Under Helix:

- weights (AFTER hook on post_load_weights): the q projection and W_UK (`w_kc`) are replicated
  for all H heads on every rank (`helix_q_weight` [H*(dn+dr), in], `helix_w_kc` [H, dn, R],
  gathered once over the attention TP group right after loading: more weight memory, no
  per-layer Q collective). o_proj keeps rank g's H/N slice; so does W_UV (`w_vc`), except with
  --helix-mla-exchange value, where W_UV is replicated too (`helix_w_vc` [H, R, Dv], gathered
  the same way: H x R x Dv more weight elements per layer, docs/math.md section 4).
- prepare (AROUND forward_absorb_prepare): every rank computes all H absorbed queries
  q_nope_out [T, H, R], q_pe [T, H, Dr] and the new tokens' latent k_nope [T, 1, R], k_pe [T, 1, Dr].
- core (AROUND forward_absorb_core): q [T, H, R+Dr], k [T, 1, R+Dr], v [T, 1, R] go to the Helix
  MLA backend (srt.backends.mla), which stores the latent on the page owner only and returns rank
  g's merged head slice [T, H/N * R]; then W_UV for those heads and the row-parallel o_proj.
  Value exchange: the backend gets w_uv = helix_w_vc, projects each rank's partial of all H heads
  before the exchange and returns values [T, H/N * Dv], which go straight to o_proj.
- dispatch (AROUND dispatch_attn_forward_method): every forward takes the absorbed path.

Every hook calls straight through unless the process's HelixConfig is an MLA one.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ...config import HelixConfig
from ...errors import HelixError
from .. import state
from ..backends.base import BACKEND_NAME
from ..backends.mla import find_helix_mla_backend
from ..hooks import HookSpec

logger = logging.getLogger(__name__)

MLA_CLASS = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
DISPATCH_TARGET = f"{MLA_CLASS}.dispatch_attn_forward_method"
PREPARE_TARGET = f"{MLA_CLASS}.forward_absorb_prepare"
CORE_TARGET = f"{MLA_CLASS}.forward_absorb_core"
POST_LOAD_TARGET = (
    "sglang.srt.models.deepseek_common.deepseek_weight_loader."
    "DeepseekV2WeightLoaderMixin.post_load_weights"
)


class HelixMLAError(HelixError):
    """The Helix MLA path cannot serve this setup; the message names the flag and the fix."""


def mla_config() -> Optional[HelixConfig]:
    """This process's MLA HelixConfig, or None (Helix off, or a GQA model)."""
    cfg = state.current_config()
    return cfg if cfg is not None and cfg.mla else None


# ----------------------------------------------------------------------------- weights


def check_helix_weights(attn: Any) -> None:
    """Refuse attention modules whose absorbed path is not plain bmm (fp8, DeepGEMM, DSA, LoRA)."""
    bad = []
    if getattr(attn, "use_dsa", False):
        bad.append("DeepSeek sparse attention (DSA, V3.2)")
    if getattr(attn, "use_deep_gemm_bmm", False) or attn.w_kc.dtype not in (
        torch.float32, torch.float16, torch.bfloat16
    ):
        bad.append(f"quantized W_UK/W_UV ({attn.w_kc.dtype})")
    if getattr(getattr(attn, "kv_b_proj", None), "set_lora", False):
        bad.append("LoRA on kv_b_proj")
    q_lin = attn.q_b_proj if attn.q_lora_rank is not None else attn.q_proj
    method = type(getattr(q_lin, "quant_method", None)).__name__
    if method not in ("UnquantizedLinearMethod", "NoneType"):
        bad.append(f"quantized q projection ({method})")
    if bad:
        raise HelixMLAError(f"--enable-helix with MLA layer {attn.layer_id}: not supported: "
                            f"{', '.join(bad)}; use an unquantized (bf16/fp16/fp32) checkpoint "
                            f"or drop --enable-helix")


def replicate_q_weights(attn: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give `attn` the q projection and W_UK of all H heads.

    gather(t): concatenation along dim 0 of every attention-TP rank's t, in rank order (rank g
    holds heads [g*H/N, (g+1)*H/N)). Sets helix_q_weight [H*(dn+dr), q_lora_rank or hidden] and
    helix_w_kc [H, dn, R]; checks the full shapes.
    """
    check_helix_weights(attn)
    q_lin = attn.q_b_proj if attn.q_lora_rank is not None else attn.q_proj
    q_weight = gather(q_lin.weight.data.contiguous())
    w_kc = gather(attn.w_kc.contiguous())
    want_q = attn.num_heads * attn.qk_head_dim
    want_kc = (attn.num_heads, attn.qk_nope_head_dim, attn.kv_lora_rank)
    if q_weight.shape[0] != want_q or tuple(w_kc.shape) != want_kc:
        raise HelixMLAError(f"layer {attn.layer_id}: gathered q weight {tuple(q_weight.shape)} / "
                            f"w_kc {tuple(w_kc.shape)}, expected [{want_q}, *] / {want_kc}; the "
                            f"attention TP group must be the N Helix ranks (--tp-size N)")
    attn.helix_q_weight = q_weight
    attn.helix_w_kc = w_kc


def replicate_w_uv(attn: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give `attn` W_UV of all H heads, helix_w_vc [H, R, Dv] (--helix-mla-exchange value).

    gather(t): as in replicate_q_weights; rank g's w_vc [H/N, R, Dv] holds heads g*H/N...
    """
    check_helix_weights(attn)
    w_vc = gather(attn.w_vc.contiguous())
    want = (attn.num_heads, attn.kv_lora_rank, attn.v_head_dim)
    if tuple(w_vc.shape) != want:
        raise HelixMLAError(f"layer {attn.layer_id}: gathered w_vc {tuple(w_vc.shape)}, expected "
                            f"{want}; the attention TP group must be the N Helix ranks "
                            f"(--tp-size N)")
    attn.helix_w_vc = w_vc


def group_gather(group_coordinator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """gather(t) for SGLang's attention TP GroupCoordinator (plain torch.distributed all_gather)."""
    size = group_coordinator.world_size
    if size == 1:
        return lambda t: t
    group = group_coordinator.device_group

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=0)

    return gather


def _after_post_load(result: Any, model: Any, *args: Any, **kwargs: Any) -> None:
    cfg = mla_config()
    if cfg is None:
        return None
    from sglang.srt.models.deepseek_v2 import DeepseekV2AttentionMLA
    from sglang.srt.runtime_context import get_parallel

    gather = group_gather(get_parallel().attn_tp_group)
    count = 0
    for module in model.modules():
        if isinstance(module, DeepseekV2AttentionMLA) and module.w_kc is not None:
            replicate_q_weights(module, gather)
            if cfg.mla_exchange == "value":
                replicate_w_uv(module, gather)
            count += 1
    logger.info("sglang_helix: replicated q projection + W_UK (all heads) in %d MLA layers", count)
    if cfg.mla_exchange == "value":
        logger.info("sglang_helix: replicated W_UV (all heads, --helix-mla-exchange value) in %d "
                    "MLA layers", count)
    return None


# ----------------------------------------------------------------------------- model path


def absorbed_qkv(attn: Any, positions: torch.Tensor, q: torch.Tensor, latent: torch.Tensor):
    """All-head absorbed queries and the new tokens' latent KV.

    q [T, H*(dn+dr)] (replicated projection), latent [T, R+Dr] (kv_a_proj output).
    Returns q_nope_out [T, H, R] (q_nope @ W_UK), q_pe [T, H, Dr], k_nope [T, 1, R] (normed),
    k_pe [T, 1, Dr] (rope applied to q_pe and k_pe).
    """
    rank_r = attn.kv_lora_rank
    q = q.view(-1, attn.num_heads, attn.qk_head_dim)
    q_nope, q_pe = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    k_nope = attn.kv_a_layernorm(latent[..., :rank_r]).unsqueeze(1)
    k_pe = latent[..., rank_r:].unsqueeze(1)
    q_nope_out = torch.bmm(q_nope.transpose(0, 1), attn.helix_w_kc).transpose(0, 1)
    if attn.rotary_emb is not None:
        q_pe, k_pe = attn.rotary_emb(positions, q_pe, k_pe)
    return q_nope_out, q_pe, k_nope, k_pe


def _project(attn: Any, hidden_states: torch.Tensor):
    """(q [T, H*(dn+dr)] for all heads, latent [T, R+Dr]) from the layer input."""
    if attn.q_lora_rank is not None:
        from sglang.srt.layers.layer_boundary import get_attn_tp_context

        q_lora, latent = get_attn_tp_context().fetch_qkv_latent().split(
            [attn.q_lora_rank, attn.kv_lora_rank + attn.qk_rope_head_dim], dim=-1)
        return torch.nn.functional.linear(attn.q_a_layernorm(q_lora), attn.helix_q_weight), latent
    q = torch.nn.functional.linear(hidden_states, attn.helix_q_weight)
    return q, attn.kv_a_proj_with_mqa(hidden_states)[0]


def helix_absorb_prepare(attn, positions, hidden_states, forward_batch, zero_allocator,
                         llama_4_scaling=None, prev_topk_indices=None):
    """Helix replacement of forward_absorb_prepare; same 10-tuple as SGLang's (no fusion plan,
    no top-k), with q for all H heads."""
    if getattr(attn, "helix_w_kc", None) is None:
        raise HelixMLAError(f"MLA layer {attn.layer_id} has no replicated W_UK: the post-load "
                            f"hook ({POST_LOAD_TARGET}) did not run; call "
                            f"sglang_helix.srt.plugin.register()")
    q, latent = _project(attn, hidden_states)
    q_nope_out, q_pe, k_nope, k_pe = absorbed_qkv(attn, positions, q, latent)
    return (q_pe, k_pe, q_nope_out, k_nope, forward_batch, zero_allocator, positions, None,
            llama_4_scaling, None)


def latent_to_output(attn: Any, latent: torch.Tensor) -> torch.Tensor:
    """latent [T, H/N * R] (this rank's merged heads) -> W_UV -> o_proj (row parallel, TP = N)."""
    lat = latent.view(-1, attn.num_local_heads, attn.kv_lora_rank)
    values = torch.bmm(lat.transpose(0, 1), attn.w_vc).transpose(0, 1)  # w_vc [H/N, R, Dv]
    return values_to_output(attn, values.flatten(1, 2))


def values_to_output(attn: Any, values: torch.Tensor) -> torch.Tensor:
    """values [T, H/N * Dv] (this rank's heads, after W_UV) -> o_proj (row parallel, TP = N)."""
    output, _ = attn.o_proj(values.reshape(values.shape[0], -1))
    return output


def helix_absorb_core(attn, q_pe, k_pe, q_nope_out, k_nope, forward_batch, zero_allocator,
                      positions, topk_indices, llama_4_scaling, fusion_plan=None,
                      attention_output_gate=None):
    """Helix replacement of forward_absorb_core: backend (store + attention + exchange + merge),
    then W_UV and o_proj for this rank's H/N heads (value exchange: the backend applied W_UV of
    all heads before the exchange; o_proj only)."""
    w_uv = _replicated_w_uv(attn)
    q = torch.cat([q_nope_out, q_pe], dim=-1)  # [T, H, R + Dr]
    if llama_4_scaling is not None:
        q = q * llama_4_scaling
    k = torch.cat([k_nope, k_pe], dim=-1)  # [T, 1, R + Dr]
    backend = find_helix_mla_backend()
    extra = {} if w_uv is None else {"w_uv": w_uv}
    out = backend.forward(q, k, k_nope, attn.attn_mqa, forward_batch, save_kv_cache=True, **extra)
    output = latent_to_output(attn, out) if w_uv is None else values_to_output(attn, out)
    if attn.next_skip_topk is None:
        return output
    return output, None


def _replicated_w_uv(attn: Any) -> Optional[torch.Tensor]:
    """helix_w_vc under --helix-mla-exchange value, else None (latent exchange)."""
    cfg = mla_config()
    if cfg is None or cfg.mla_exchange != "value":
        return None
    w_uv = getattr(attn, "helix_w_vc", None)
    if w_uv is None:
        raise HelixMLAError(f"MLA layer {attn.layer_id} has no replicated W_UV for "
                            f"--helix-mla-exchange value: the post-load hook ({POST_LOAD_TARGET}) "
                            f"did not run; call sglang_helix.srt.plugin.register()")
    return w_uv


def _around_dispatch(original: Callable, attn: Any, forward_batch: Any, *args: Any, **kwargs: Any):
    if mla_config() is None:
        return original(attn, forward_batch, *args, **kwargs)
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
        AttnForwardMethod,
    )

    attn.current_attention_backend = BACKEND_NAME
    return AttnForwardMethod.MLA


def _around_prepare(original: Callable, attn: Any, *args: Any, **kwargs: Any):
    if mla_config() is None:
        return original(attn, *args, **kwargs)
    return helix_absorb_prepare(attn, *args, **kwargs)


def _around_core(original: Callable, attn: Any, *args: Any, **kwargs: Any):
    if mla_config() is None:
        return original(attn, *args, **kwargs)
    return helix_absorb_core(attn, *args, **kwargs)


MLA_HOOKS = (
    HookSpec(POST_LOAD_TARGET, "AFTER", _after_post_load),
    HookSpec(DISPATCH_TARGET, "AROUND", _around_dispatch),
    HookSpec(PREPARE_TARGET, "AROUND", _around_prepare),
    HookSpec(CORE_TARGET, "AROUND", _around_core),
)
