"""DeepSeek-V2/V3 MLA under Helix in SGLang 0.5.23: weight replication and the absorbed model path.

Layout (TPA = 1, KVP = N = --tp-size; docs/math.md): SGLang builds DeepseekV2AttentionMLA with
attention TP = N as usual, so q_b_proj (q_proj), kv_b_proj (w_kc / w_vc) and o_proj hold H/N
heads on rank g. Under Helix:

- weights (AFTER hook on post_load_weights): the q projection and W_UK (`w_kc`) are replicated
  for all H heads on every rank (`helix_q_weight` [H*(dn+dr), in], `helix_w_kc` [H, dn, R],
  gathered once over the attention TP group right after loading: more weight memory, no
  per-layer Q collective). fp8 checkpoints: the q projection becomes `helix_q_proj`, a
  ReplicatedLinear with the checkpoint's fp8 method holding every rank's raw fp8 shard + block
  scales (post_load_weights runs before SGLang's postprocess_weights, which processes it like any
  fp8 layer); an fp8 `w_kc` / `w_vc` (SGLang's per-tensor conversion of kv_b_proj) is gathered as
  `w.to(bf16) * w_scale`, the tensor SGLang's CPU branch multiplies (absorb_weight). o_proj keeps rank g's H/N slice; so does W_UV (`w_vc`), except with
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

logger = logging.getLogger(__name__)

# Named in refusals; the hook's row (target, kind) is in srt.hook_table.
POST_LOAD_HOOK = "the Helix post-load hook (AFTER DeepseekV2WeightLoaderMixin.post_load_weights)"


class HelixMLAError(HelixError):
    """The Helix MLA path cannot serve this setup; the message names the flag and the fix."""


def mla_config() -> Optional[HelixConfig]:
    """This process's MLA HelixConfig, or None (Helix off, or a GQA model)."""
    cfg = state.current_config()
    return cfg if cfg is not None and cfg.mla else None


# ----------------------------------------------------------------------------- weights


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
# q projection methods Helix replicates: as is, or as a ReplicatedLinear with the same fp8 method.
HELIX_Q_METHODS = ("UnquantizedLinearMethod", "NoneType", "Fp8LinearMethod")


def _q_linear(attn: Any) -> Any:
    return attn.q_b_proj if attn.q_lora_rank is not None else attn.q_proj


def check_helix_weights(attn: Any) -> None:
    """Refuse attention modules whose absorbed path Helix cannot replicate (DeepGEMM bmm, DSA,
    LoRA, a q projection quantized other than fp8, fp8 W_UK/W_UV without a per-tensor scale)."""
    bad = []
    if getattr(attn, "use_dsa", False):
        bad.append("DeepSeek sparse attention (DSA, V3.2)")
    if getattr(attn, "use_deep_gemm_bmm", False):
        bad.append("DeepGEMM block-fp8 W_UK/W_UV bmm (SGLANG_USE_DEEPGEMM_BMM=1: unset it)")
    elif attn.w_kc.dtype in _FP8_DTYPES and getattr(attn, "w_scale", None) is None:
        bad.append(f"{attn.w_kc.dtype} W_UK/W_UV without a per-tensor w_scale")
    elif attn.w_kc.dtype not in _FLOAT_DTYPES + _FP8_DTYPES:
        bad.append(f"quantized W_UK/W_UV ({attn.w_kc.dtype})")
    if getattr(getattr(attn, "kv_b_proj", None), "set_lora", False):
        bad.append("LoRA on kv_b_proj")
    method = type(getattr(_q_linear(attn), "quant_method", None)).__name__
    if method not in HELIX_Q_METHODS:
        bad.append(f"q projection quantized with {method}")
    if bad:
        raise HelixMLAError(f"--enable-helix with MLA layer {attn.layer_id}: not supported: "
                            f"{', '.join(bad)}; Helix serves bf16/fp16/fp32, fp8 (e4m3) and NVFP4 "
                            f"(MLA projections unquantized, as ModelOpt exports them) checkpoints: "
                            f"use one of those or drop --enable-helix")


def absorb_weight(attn: Any, w: torch.Tensor) -> torch.Tensor:
    """W_UK (w_kc) / W_UV (w_vc) as the absorbed bmm applies it: unquantized as is; fp8 with its
    per-tensor `w_scale` (SGLang converts a block-fp8 kv_b_proj to that at load) dequantized to
    bf16 exactly as SGLang's CPU branch does (`w.to(bf16) * w_scale`; its CUDA branch runs
    bmm_fp8 on per-tensor-quantized activations instead, docs/usage.md)."""
    if w.dtype in _FLOAT_DTYPES:
        return w
    return w.to(torch.bfloat16) * attn.w_scale


def replicated_projection(q_lin: Any, gather: Callable[[torch.Tensor], torch.Tensor],
                          out_features: int, prefix: str) -> Any:
    """A ReplicatedLinear with q_lin's quant method holding the q projection of all heads.

    Built at post_load_weights, before SGLang's postprocess_weights, with the raw checkpoint
    tensors (fp8 weight [out, in] + its scales) gathered over the attention TP group; registered
    as a submodule, so SGLang processes it like every other fp8 layer on this platform.
    """
    from sglang.srt.layers.linear import ReplicatedLinear

    with torch.device(q_lin.weight.device):
        proj = ReplicatedLinear(q_lin.input_size, out_features, bias=False,
                                params_dtype=q_lin.params_dtype, quant_config=q_lin.quant_config,
                                prefix=prefix)
    if type(proj.quant_method) is not type(q_lin.quant_method):
        raise HelixMLAError(f"{prefix}: the replicated q projection got "
                            f"{type(proj.quant_method).__name__}, the stock one "
                            f"{type(q_lin.quant_method).__name__}; drop --enable-helix")
    own = dict(q_lin.named_parameters(recurse=False))
    for name, param in proj.named_parameters(recurse=False):
        if name not in own:
            raise HelixMLAError(f"{prefix}: the stock q projection has no {name!r} to replicate")
        data = own[name].data
        full = data if data.shape == param.shape else gather(data.contiguous())
        if full.shape != param.shape:
            raise HelixMLAError(f"{prefix}.{name}: gathered {tuple(full.shape)}, expected "
                                f"{tuple(param.shape)}; the attention TP group must be the N "
                                f"Helix ranks (--tp-size N)")
        param.data.copy_(full)
    return proj


def replicate_q_weights(attn: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give `attn` the q projection and W_UK of all H heads.

    gather(t): concatenation along dim 0 of every attention-TP rank's t, in rank order (rank g
    holds heads [g*H/N, (g+1)*H/N)). Sets helix_w_kc [H, dn, R] (fp8: dequantized, absorb_weight)
    and, unquantized, helix_q_weight [H*(dn+dr), q_lora_rank or hidden]; fp8, the submodule
    helix_q_proj (replicated_projection). Checks the full shapes.
    """
    check_helix_weights(attn)
    q_lin = _q_linear(attn)
    want_q = attn.num_heads * attn.qk_head_dim
    if type(getattr(q_lin, "quant_method", None)).__name__ == "Fp8LinearMethod":
        attn.helix_q_proj = replicated_projection(
            q_lin, gather, want_q, f"model.layers.{attn.layer_id}.self_attn.helix_q_proj")
        q_rows = want_q
    else:
        attn.helix_q_weight = gather(q_lin.weight.data.contiguous())
        q_rows = attn.helix_q_weight.shape[0]
    w_kc = gather(absorb_weight(attn, attn.w_kc).contiguous())
    want_kc = (attn.num_heads, attn.qk_nope_head_dim, attn.kv_lora_rank)
    if q_rows != want_q or tuple(w_kc.shape) != want_kc:
        raise HelixMLAError(f"layer {attn.layer_id}: gathered q weight [{q_rows}, *] / "
                            f"w_kc {tuple(w_kc.shape)}, expected [{want_q}, *] / {want_kc}; the "
                            f"attention TP group must be the N Helix ranks (--tp-size N)")
    attn.helix_w_kc = w_kc


def _weights_kind(attn: Any) -> str:
    """'fp8 q projection, W_UK fp8 -> bf16' or 'unquantized': what the Helix path replicated."""
    proj = getattr(attn, "helix_q_proj", None)
    if proj is None:
        return "unquantized"
    return (f"{type(proj.quant_method).__name__} q projection, W_UK {attn.w_kc.dtype} -> "
            f"{attn.helix_w_kc.dtype}").replace("torch.", "")


def replicate_w_uv(attn: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give `attn` W_UV of all H heads, helix_w_vc [H, R, Dv] (--helix-mla-exchange value).

    gather(t): as in replicate_q_weights; rank g's w_vc [H/N, R, Dv] holds heads g*H/N...
    """
    check_helix_weights(attn)
    w_vc = gather(absorb_weight(attn, attn.w_vc).contiguous())
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
        if t.dtype in _FP8_DTYPES:  # gloo has no fp8: move the bytes
            return gather(t.view(torch.uint8)).view(t.dtype)
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
    count, kinds = 0, set()
    for module in list(model.modules()):  # replicate_q_weights may add a submodule
        if isinstance(module, DeepseekV2AttentionMLA) and module.w_kc is not None:
            replicate_q_weights(module, gather)
            if cfg.mla_exchange == "value":
                replicate_w_uv(module, gather)
            count += 1
            kinds.add(_weights_kind(module))
    logger.info("sglang_helix: replicated q projection + W_UK (all heads) in %d MLA layers (%s)",
                count, ", ".join(sorted(kinds)) or "none")
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
    w_kc = attn.helix_w_kc
    q_nope_out = torch.bmm(q_nope.transpose(0, 1).to(w_kc.dtype), w_kc).transpose(0, 1)
    if attn.rotary_emb is not None:
        q_pe, k_pe = attn.rotary_emb(positions, q_pe, k_pe)
    return q_nope_out, q_pe, k_nope, k_pe


def _project(attn: Any, hidden_states: torch.Tensor):
    """(q [T, H*(dn+dr)] for all heads, latent [T, R+Dr]) from the layer input."""
    if attn.q_lora_rank is not None:
        from sglang.srt.layers.layer_boundary import get_attn_tp_context

        q_lora, latent = get_attn_tp_context().fetch_qkv_latent().split(
            [attn.q_lora_rank, attn.kv_lora_rank + attn.qk_rope_head_dim], dim=-1)
        return _q_projection(attn, attn.q_a_layernorm(q_lora)), latent
    return _q_projection(attn, hidden_states), attn.kv_a_proj_with_mqa(hidden_states)[0]


def _q_projection(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> q [T, H*(dn+dr)] with the replicated projection (fp8 module or weight)."""
    proj = getattr(attn, "helix_q_proj", None)
    if proj is not None:
        return proj(x)[0]
    return torch.nn.functional.linear(x, attn.helix_q_weight)


def helix_absorb_prepare(attn, positions, hidden_states, forward_batch, zero_allocator,
                         llama_4_scaling=None, prev_topk_indices=None):
    """Helix replacement of forward_absorb_prepare; same 10-tuple as SGLang's (no fusion plan,
    no top-k), with q for all H heads."""
    if getattr(attn, "helix_w_kc", None) is None:
        raise HelixMLAError(f"MLA layer {attn.layer_id} has no replicated W_UK: {POST_LOAD_HOOK} "
                            f"did not run; call "
                            f"sglang_helix.srt.plugin.register()")
    q, latent = _project(attn, hidden_states)
    q_nope_out, q_pe, k_nope, k_pe = absorbed_qkv(attn, positions, q, latent)
    return (q_pe, k_pe, q_nope_out, k_nope, forward_batch, zero_allocator, positions, None,
            llama_4_scaling, None)


def latent_to_output(attn: Any, latent: torch.Tensor) -> torch.Tensor:
    """latent [T, H/N * R] (this rank's merged heads) -> W_UV -> o_proj (row parallel, TP = N)."""
    lat = latent.view(-1, attn.num_local_heads, attn.kv_lora_rank)
    w_vc = absorb_weight(attn, attn.w_vc)  # [H/N, R, Dv]
    values = torch.bmm(lat.transpose(0, 1).to(w_vc.dtype), w_vc).transpose(0, 1)
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
                            f"--helix-mla-exchange value: {POST_LOAD_HOOK} "
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
