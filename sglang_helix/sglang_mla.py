"""Helix for DeepSeek MLA inside SGLang 0.5.23: model hooks, the "helix" MLA backend, CPU fix.

Layout (TPA = 1, KVP = N = --tp-size; docs/math.md): SGLang builds DeepseekV2AttentionMLA with
attention TP = N as usual, so q_b_proj (q_proj), kv_b_proj (w_kc / w_vc) and o_proj hold H/N
heads on rank g. Under Helix:

- weights (AFTER hook on post_load_weights): the q projection and W_UK (`w_kc`) are replicated
  for all H heads on every rank (`helix_q_weight` [H*(dn+dr), in], `helix_w_kc` [H, dn, R],
  gathered once over the attention TP group right after loading — the paper's choice: more
  weight memory, no per-layer Q collective). W_UV (`w_vc`) and o_proj keep rank g's H/N slice.
- prepare (AROUND forward_absorb_prepare): every rank computes all H absorbed queries
  q_nope_out [T, H, R], q_pe [T, H, Dr] and the new tokens' latent k_nope [T, 1, R], k_pe [T, 1, Dr].
- core (AROUND forward_absorb_core): q [T, H, R+Dr], k [T, 1, R+Dr], v [T, 1, R] go to the Helix
  MLA backend, which stores the latent on the page owner only and returns rank g's merged head
  slice [T, H/N * R]; then W_UV for those heads and the row-parallel o_proj (TP = N).
- dispatch (AROUND dispatch_attn_forward_method): every forward takes the absorbed path.

Backend (`HelixMLAAttnBackend`, made by `create_helix_mla_backend`):
- decode: partial attention over this rank's pages for all H heads + one exchange + merge
  (sglang_helix.helix.HelixAttention.forward_mla).
- extend (prefill, cached radix prefix, chunked prefill): the chunk's queries attend
  (a) the cached prefix: partial over this rank's prefix pages for all H heads, and
  (b) the chunk itself: causal, over the chunk's latent which every rank has, computed by rank g
  for its own H/N heads only and LSE-merged into the partial it "sends to itself";
  one exchange then merges everything into [T, H/N, R]. No prefix KV is gathered.

`install_cpu_absorbed_mla()`: SGLang's torch_native backend has no DeepSeek handler and falls
back to Triton's, whose MHA prefill attends the latent pool as if it were k/v (crash when
kv_lora_rank != qk_nope_head_dim, wrong tokens when equal). With SGLANG_USE_CPU_ENGINE=1 the
torch_native handler is pointed at the absorbed path (correct for any shape).

Helix is "on" for a process when its published ServerArgs carries `_helix_layout` (an MLA
HelixConfig); otherwise every hook calls straight through.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .attention import merge_partials, partial_attention_mla
from .config import HelixConfig, HelixConfigError
from .helix import HelixAttention
from .hooks import missing_hooks, register_once, target_wraps
from .sgl_kernel_cpu_stub import cpu_engine_requested

logger = logging.getLogger(__name__)

LAYOUT_ATTR = "_helix_layout"
BACKEND_NAME = "helix"
MLA_CLASS = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
DISPATCH_TARGET = f"{MLA_CLASS}.dispatch_attn_forward_method"
PREPARE_TARGET = f"{MLA_CLASS}.forward_absorb_prepare"
CORE_TARGET = f"{MLA_CLASS}.forward_absorb_core"
POST_LOAD_TARGET = (
    "sglang.srt.models.deepseek_common.deepseek_weight_loader."
    "DeepseekV2WeightLoaderMixin.post_load_weights"
)
CPU_HANDLER_TARGET = (
    "sglang.srt.models.deepseek_common.attention_backend_handler."
    "AttentionBackendRegistry.get_handler"
)
CPU_BACKENDS = ("torch_native",)
# Opt-out (value "0") for tests that pin SGLang's own, broken CPU MLA behaviour.
CPU_FIX_ENV = "SGLANG_HELIX_CPU_MLA_FIX"


class HelixMLAError(RuntimeError):
    """The Helix MLA path cannot serve this setup; the message names the flag and the fix."""


# ----------------------------------------------------------------------------- layout


def active_layout() -> Optional[HelixConfig]:
    """This process's MLA Helix layout (from the published ServerArgs), or None (Helix off)."""
    from sglang.srt.runtime_context import get_server_args

    try:
        server_args = get_server_args()
    except (AttributeError, ValueError):  # nothing published (e.g. a bare import)
        return None
    cfg = getattr(server_args, LAYOUT_ATTR, None)
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
    if active_layout() is None:
        return None
    from sglang.srt.models.deepseek_v2 import DeepseekV2AttentionMLA
    from sglang.srt.runtime_context import get_parallel

    gather = group_gather(get_parallel().attn_tp_group)
    count = 0
    for module in model.modules():
        if isinstance(module, DeepseekV2AttentionMLA) and module.w_kc is not None:
            replicate_q_weights(module, gather)
            count += 1
    logger.info("sglang_helix: replicated q projection + W_UK (all heads) in %d MLA layers", count)
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
                            f"sglang_helix.sglang_mla.install_mla_hooks() in plugin.register()")
    q, latent = _project(attn, hidden_states)
    q_nope_out, q_pe, k_nope, k_pe = absorbed_qkv(attn, positions, q, latent)
    return (q_pe, k_pe, q_nope_out, k_nope, forward_batch, zero_allocator, positions, None,
            llama_4_scaling, None)


def latent_to_output(attn: Any, latent: torch.Tensor) -> torch.Tensor:
    """latent [T, H/N * R] (this rank's merged heads) -> W_UV -> o_proj (row parallel, TP = N)."""
    lat = latent.view(-1, attn.num_local_heads, attn.kv_lora_rank)
    values = torch.bmm(lat.transpose(0, 1), attn.w_vc).transpose(0, 1)  # w_vc [H/N, R, Dv]
    output, _ = attn.o_proj(values.flatten(1, 2))
    return output


def helix_absorb_core(attn, q_pe, k_pe, q_nope_out, k_nope, forward_batch, zero_allocator,
                      positions, topk_indices, llama_4_scaling, fusion_plan=None,
                      attention_output_gate=None):
    """Helix replacement of forward_absorb_core: backend (store + attention + exchange + merge),
    then W_UV and o_proj for this rank's H/N heads."""
    q = torch.cat([q_nope_out, q_pe], dim=-1)  # [T, H, R + Dr]
    if llama_4_scaling is not None:
        q = q * llama_4_scaling
    k = torch.cat([k_nope, k_pe], dim=-1)  # [T, 1, R + Dr]
    backend = find_helix_mla_backend()
    latent = backend.forward(q, k, k_nope, attn.attn_mqa, forward_batch, save_kv_cache=True)
    output = latent_to_output(attn, latent)
    if attn.next_skip_topk is None:
        return output
    return output, None


def find_helix_mla_backend(backend: Any = None) -> "HelixMLAAttnBackend":
    """The HelixMLAAttnBackend of this runner (direct, or inside a hybrid / TBO wrapper)."""
    if backend is None:
        from sglang.srt.model_executor.forward_context import get_attn_backend

        backend = get_attn_backend()
    seen = [backend]
    while seen:
        item = seen.pop()
        if isinstance(item, HelixMLAAttnBackend):
            return item
        for name in ("decode_backend", "prefill_backend", "primary"):
            child = getattr(item, name, None)
            if child is not None:
                seen.append(child)
    raise HelixMLAError(f"--enable-helix with an MLA model needs the '{BACKEND_NAME}' attention "
                        f"backend, got {type(backend).__name__}: declare attention_backend="
                        f"'{BACKEND_NAME}' (prefill and decode) in the plugin's resolution hook")


def _around_dispatch(original: Callable, attn: Any, forward_batch: Any, *args: Any, **kwargs: Any):
    if active_layout() is None:
        return original(attn, forward_batch, *args, **kwargs)
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
        AttnForwardMethod,
    )

    attn.current_attention_backend = BACKEND_NAME
    return AttnForwardMethod.MLA


def _around_prepare(original: Callable, attn: Any, *args: Any, **kwargs: Any):
    if active_layout() is None:
        return original(attn, *args, **kwargs)
    return helix_absorb_prepare(attn, *args, **kwargs)


def _around_core(original: Callable, attn: Any, *args: Any, **kwargs: Any):
    if active_layout() is None:
        return original(attn, *args, **kwargs)
    return helix_absorb_core(attn, *args, **kwargs)


MLA_HOOKS = (
    (POST_LOAD_TARGET, _after_post_load, "AFTER"),
    (DISPATCH_TARGET, _around_dispatch, "AROUND"),
    (PREPARE_TARGET, _around_prepare, "AROUND"),
    (CORE_TARGET, _around_core, "AROUND"),
)


def install_mla_hooks() -> None:
    """Register the model-side Helix MLA hooks (idempotent; call from plugin.register()).

    Every hook calls straight through unless the process's ServerArgs has an MLA `_helix_layout`.
    """
    for target, hook, kind in MLA_HOOKS:
        register_once(target, hook, kind)


def mla_hooks_live() -> list[str]:
    """Targets whose live attribute does not (yet) wrap our hook; [] once apply_hooks() ran."""
    return missing_hooks((target, hook) for target, hook, _ in MLA_HOOKS)


# ----------------------------------------------------------------------------- CPU workaround


def _torch_native_mla_handler(attn: Any, forward_batch: Any):
    """Every torch_native MLA forward (prefill included) takes the absorbed path."""
    from sglang.srt.models.deepseek_common.attention_backend_handler import _dispatch_mla_subtype

    return _dispatch_mla_subtype(attn, forward_batch)


def _around_get_handler(original: Callable, registry: Any, backend_name: str, *args, **kwargs):
    if backend_name in CPU_BACKENDS:
        return _torch_native_mla_handler
    return original(registry, backend_name, *args, **kwargs)


def install_cpu_absorbed_mla(environ=None) -> bool:
    """With SGLANG_USE_CPU_ENGINE=1, route every torch_native MLA forward to the absorbed path.

    Registers an AROUND hook on AttentionBackendRegistry.get_handler (applied by SGLang's
    apply_hooks). Returns True if registered; a no-op (False) off the CPU engine or with
    SGLANG_HELIX_CPU_MLA_FIX=0. Idempotent.
    """
    env = os.environ if environ is None else environ
    if not cpu_engine_requested(env) or env.get(CPU_FIX_ENV, "1") == "0":
        return False
    register_once(CPU_HANDLER_TARGET, _around_get_handler, "AROUND")
    return True


def cpu_absorbed_mla_live() -> bool:
    """True once the CPU workaround wraps AttentionBackendRegistry.get_handler."""
    return target_wraps(CPU_HANDLER_TARGET, _around_get_handler)


# ----------------------------------------------------------------------------- attention math


def chunk_causal_mla(q: torch.Tensor, chunk_kv: torch.Tensor, extend_lens: Sequence[int],
                     scale: float, kv_lora_rank: int):
    """Causal absorbed attention of each request's chunk over the chunk's own latent KV.

    q [T, Hs, R+Dr] (any head subset), chunk_kv [T, R+Dr] (latent c_kv | k_pe of the same T
    tokens, requests back to back, lengths extend_lens). Query i of a request sees its chunk
    tokens 0..i. Returns out [T, Hs, R] in q's dtype and lse [T, Hs] fp32 natural log.
    """
    outs, lses, start = [], [], 0
    for n in extend_lens:
        qs = q[start:start + n].float()
        ks = chunk_kv[start:start + n].float()
        scores = torch.einsum("thw,sw->hts", qs, ks) * scale
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [Hs, n]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.einsum("hts,sr->thr", probs, ks[:, :kv_lora_rank]).to(q.dtype))
        lses.append(lse.transpose(0, 1))
        start += n
    return torch.cat(outs), torch.cat(lses).contiguous()


def prefix_partial_mla(q: torch.Tensor, kv_cache: torch.Tensor, page_table: torch.Tensor,
                       local_lens: torch.Tensor, extend_lens: Sequence[int], scale: float,
                       kv_lora_rank: int, impl: str = "auto"):
    """Partial attention of every chunk query over this rank's pages of its request's prefix.

    q [T, H, R+Dr]; kv_cache [slots, P, R+Dr]; page_table [B, pages] local slots and
    local_lens [B] this rank's prefix tokens per request. One latent KV head, so a request's
    n chunk tokens x H heads are n*H query rows against the same pages.
    Returns out [T, H, R] (q's dtype), lse [T, H] fp32 (-inf where this rank has no prefix token).
    """
    heads, width = q.shape[1], q.shape[2]
    outs, lses, start = [], [], 0
    for i, n in enumerate(extend_lens):
        rows = q[start:start + n].reshape(1, n * heads, width)
        out, lse = partial_attention_mla(
            rows[..., :kv_lora_rank].contiguous(), rows[..., kv_lora_rank:].contiguous(), kv_cache,
            page_table[i:i + 1], local_lens[i:i + 1], scale, impl=impl)
        outs.append(out.view(n, heads, kv_lora_rank))
        lses.append(lse.view(n, heads))
        start += n
    return torch.cat(outs), torch.cat(lses)


def merge_two(out_a, lse_a, out_b, lse_b):
    """LSE merge of two partials [T, Hs, R] / [T, Hs] -> (out [T, Hs, R], lse [T, Hs])."""
    return merge_partials(torch.stack([out_a, out_b]), torch.stack([lse_a.float(), lse_b.float()]))


def helix_mla_extend(q: torch.Tensor, chunk_kv: torch.Tensor, extend_lens: Sequence[int],
                     prefix_lens: Sequence[int], prefix_partial: Optional[Callable], scale: float,
                     kv_lora_rank: int, kvp_rank: int, heads_per_rank: int,
                     exchange: Optional[Callable]) -> torch.Tensor:
    """Absorbed-MLA prefill of one chunk on KVP rank d = kvp_rank; returns [T, H/N, R].

    q [T, H, R+Dr] all heads; chunk_kv [T, R+Dr] the chunk's latent (every rank has it);
    extend_lens / prefix_lens: host ints per request (identical on all ranks, so every rank
    takes the same branch and issues the same collectives).
    prefix_partial(q) -> (out [T, H, R], lse [T, H]) over this rank's cached-prefix pages;
    exchange(out, lse) -> merged [T, H/N, R] (sglang_helix.comm: head slice d to rank d).
    Rank d merges the chunk's causal attention for its own heads into the slice it keeps, so
    one exchange yields prefix + chunk attention. Without any cached prefix there is nothing
    to exchange: each rank only attends its own heads over the chunk.
    """
    own = slice(kvp_rank * heads_per_rank, (kvp_rank + 1) * heads_per_rank)
    chunk_out, chunk_lse = chunk_causal_mla(q[:, own], chunk_kv, extend_lens, scale, kv_lora_rank)
    if not any(int(p) for p in prefix_lens):
        return chunk_out
    out, lse = prefix_partial(q)
    out, lse = out.clone(), lse.clone()
    out[:, own], lse[:, own] = merge_two(out[:, own], lse[:, own], chunk_out, chunk_lse)
    return exchange(out.contiguous(), lse.contiguous())


# ----------------------------------------------------------------------------- backend


def _backend_base():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


class HelixMLAAttnBackend(_backend_base()):
    """SGLang attention backend of one Helix rank for absorbed MLA.

    Inputs from the Helix model path (helix_absorb_core): q [T, H, R+Dr] (or [T, H*(R+Dr)]) for
    ALL H heads, k [T, 1, R+Dr] (latent | rope of the new tokens), v [T, 1, R]; returns
    [T, H/N * R], latent outputs of heads [g*H/N, (g+1)*H/N) merged over all KVP ranks.

    model_runner: .device, .req_to_token_pool, .token_to_kv_pool (HelixMLATokenToKVPool),
    .server_args (with `_helix_layout`), .model_config (.context_len, .kv_lora_rank).
    rank: global attention rank g and kvp_group: this rank's KVP process group (default: the
    Helix runtime of sglang_helix.sglang_model); impl: partial-attention implementation.
    """

    def __init__(self, model_runner: Any, *, rank: Optional[int] = None, kvp_group=None,
                 impl: str = "auto"):
        super().__init__()
        self.cfg = _mla_layout_of(model_runner)
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = _helix_mla_pool_of(model_runner)
        self.kv_lora_rank = model_runner.model_config.kv_lora_rank
        self.impl = impl
        self.rank, group = _rank_and_group(self.cfg, rank, kvp_group)
        if self.cfg.kvp_rank(self.rank) != self.pool.kvp_rank:
            raise HelixMLAError(f"pool holds KVP rank {self.pool.kvp_rank} but rank {self.rank} is "
                                f"KVP rank {self.cfg.kvp_rank(self.rank)}")
        max_pages = math.ceil(model_runner.model_config.context_len / self.cfg.page_size)
        self.helix = HelixAttention(
            self.cfg, self.rank, group, max_batch=self.req_to_token_pool.req_to_token.shape[0],
            max_local_pages=max(1, math.ceil(max_pages / self.cfg.kvp)), impl=impl,
            device=self.device)
        self._planned = None  # the ForwardBatch the decode metadata was planned for

    # ---- metadata ---------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Decode: plan this rank's local page table + lengths once for all layers."""
        if forward_batch.forward_mode.is_decode():
            self._plan_decode(forward_batch)

    def _plan_decode(self, forward_batch: Any) -> None:
        seq_lens = forward_batch.seq_lens
        table, _ = self._local_tables(forward_batch, seq_lens)
        self.helix.plan(seq_lens, table)
        self._planned = forward_batch  # held, so its id cannot be recycled while it counts

    def _local_tables(self, forward_batch: Any, lens: torch.Tensor):
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        longest = int(lens.max()) if lens.numel() else 0
        pages = max(1, -(-longest // self.cfg.page_size))
        return self.pool.local_decode_tables(rows, lens, max_pages=pages)

    # ---- forward ----------------------------------------------------------------

    def _store(self, k, v, layer, forward_batch, save_kv_cache: bool) -> None:
        """Every rank has the new tokens' latent; the pool keeps the owner's rows only."""
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k.view(-1, 1, k.shape[-1]), v)

    def _split_q(self, q: torch.Tensor) -> torch.Tensor:
        return q.reshape(q.shape[0], self.cfg.num_heads, -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """q [B, H, R+Dr]; k [B, 1, R+Dr]; v [B, 1, R] -> [B, H/N * R]."""
        if self._planned is not forward_batch:  # a hybrid wrapper may not have planned us
            self._plan_decode(forward_batch)
        self._store(k, v, layer, forward_batch, save_kv_cache)
        q3 = self._split_q(q)
        rank_r = self.kv_lora_rank
        out = self.helix.forward_mla(q3[..., :rank_r].contiguous(), q3[..., rank_r:].contiguous(),
                                     self.pool.get_paged_kv(layer.layer_id), layer.scaling)
        return out.reshape(out.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """q [T, H, R+Dr]; k [T, 1, R+Dr]; v [T, 1, R] (the chunk) -> [T, H/N * R]."""
        self._store(k, v, layer, forward_batch, save_kv_cache)
        q3 = self._split_q(q)
        extend_lens = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        prefix_lens = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        kv_cache = self.pool.get_paged_kv(layer.layer_id)

        def prefix_partial(queries):
            lens = torch.tensor(prefix_lens, dtype=torch.int64, device=queries.device)
            table, local = self._local_tables(forward_batch, lens)
            return prefix_partial_mla(queries, kv_cache, table, local, extend_lens, layer.scaling,
                                      self.kv_lora_rank, impl=self.impl)

        out = helix_mla_extend(
            q3, k.reshape(k.shape[0], -1), extend_lens, prefix_lens, prefix_partial, layer.scaling,
            self.kv_lora_rank, self.cfg.kvp_rank(self.rank), self.cfg.heads_per_rank,
            self.helix.exchange)
        return out.reshape(out.shape[0], -1)

    def support_triton(self):
        return False


def _mla_layout_of(model_runner: Any) -> HelixConfig:
    cfg = getattr(model_runner.server_args, LAYOUT_ATTR, None)
    if cfg is None or not cfg.mla:
        raise HelixConfigError("the helix MLA backend needs --enable-helix with an MLA model "
                               "(no MLA Helix layout on ServerArgs)")
    return cfg


def _helix_mla_pool_of(model_runner: Any):
    from .sglang_pool import HelixMLATokenToKVPool

    pool = model_runner.token_to_kv_pool
    if not isinstance(pool, HelixMLATokenToKVPool):
        raise HelixMLAError(f"the helix MLA backend needs the Helix MLA KV pool, got "
                            f"{type(pool).__name__}: call sglang_helix.sglang_pool."
                            f"install_pool_hooks() in plugin.register()")
    return pool


def _rank_and_group(cfg: HelixConfig, rank: Optional[int], kvp_group):
    """(global attention rank, KVP group): explicit arguments win, else the Helix runtime that
    sglang_helix.sglang_model created right after SGLang's initialize_model_parallel."""
    from .sglang_model import runtime

    rt = runtime()
    if rank is None:
        if rt is None:
            from sglang.srt.runtime_context import get_parallel

            rank = get_parallel().attn_tp_rank
        else:
            rank = rt.rank
    if kvp_group is None and cfg.kvp > 1:
        if rt is None:
            raise HelixMLAError("the helix MLA backend needs its KVP group, created after SGLang's "
                                "initialize_model_parallel by sglang_helix.sglang_model (installed "
                                "by sglang_helix.plugin.register(); is that hook live?)")
        kvp_group = rt.kvp_group
    return rank, kvp_group


def create_helix_mla_backend(model_runner: Any) -> HelixMLAAttnBackend:
    """Factory for "helix" when the pool is a HelixMLATokenToKVPool (MLA models)."""
    return HelixMLAAttnBackend(model_runner)
