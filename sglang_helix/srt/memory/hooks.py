"""Helix KV memory wired into SGLang 0.5.23's KVCacheConfigurator (pool, allocator, capacity,
leak check), and the per-KVP-rank KV state reported in /server_info.

Each hook calls straight through unless the configurator's ServerArgs carries a HelixConfig.

FP8 KV (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): the pools store 1-byte pages and every byte count
here and in /server_info follows the pool's dtype. SGLang 0.5.23's CPU engine refuses fp8_e4m3 KV
at the top of KVCacheConfigurator.configure (its CPU attention reads fp8 only through AMX kernels;
MLA not at all); under Helix the pools and kernels are the plugin's and read fp8 pages on any CPU,
so `_around_configure` steps over that one check (Helix on, CPU, fp8 only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch

from ...config import HelixConfig
from ...kernels import kv_quant
from ...rules.kv_cache import BLOCK_SCALED_KV_DTYPES
from ...sharding import helix_logical_tokens
from .. import state
from ..hooks import HookSpec
from .allocator import HelixPagedAllocator
from .pools import HelixMHATokenToKVPool, HelixMLATokenToKVPool, HelixPoolError

logger = logging.getLogger(__name__)

CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
CONFIGURE_TARGET = f"{CONFIGURATOR}.configure"
RESOLVE_TARGET = f"{CONFIGURATOR}._resolve_memory_pool_config"
POOL_TARGET = f"{CONFIGURATOR}._build_token_to_kv_pool"
ALLOCATOR_TARGET = f"{CONFIGURATOR}._build_token_to_kv_pool_allocator"
CAPACITY_TARGET = f"{CONFIGURATOR}.logical_token_capacity"
LEAK_CHECK_TARGET = ("sglang.srt.managers.scheduler_components.invariant_checker."
                     "SchedulerInvariantChecker._check_full_pool")


def config_of_configurator(configurator: Any) -> Optional[HelixConfig]:
    """The HelixConfig a KVCacheConfigurator's ServerArgs carries, or None (Helix off)."""
    return state.config_of(getattr(configurator, "server_args", None))


def _rank_of(cfg: HelixConfig) -> int:
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.attn_tp_size != cfg.world_size:
        raise HelixPoolError(f"attention TP size {par.attn_tp_size} != KVP x TPA = {cfg.world_size}; "
                             f"set --tp-size {cfg.world_size} (no DP attention / attention CP with Helix)")
    return par.attn_tp_rank


def _check_plain_model(kvc: Any) -> None:
    unsupported = {
        "hybrid sliding-window attention": kvc.is_hybrid_swa,
        "hybrid linear / Mamba layers": kvc.mambaish_config is not None,
        "--enable-kv-cache-sharding": kvc.kv_shard_size > 1,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise HelixPoolError(f"Helix KV pools do not support: {', '.join(bad)}; drop --enable-helix "
                             f"or those features")


def check_kv_dtype(kvc: Any) -> None:
    """Helix pools hold the activation dtype, bf16/fp16/fp32, or fp8 pages with a per-tensor
    scale; a block-scaled KV cache (FP4, MXFP8) is refused, naming the flag."""
    name, dtype = getattr(kvc, "kv_cache_dtype_str", None), kvc.kv_cache_dtype
    plain = dtype in (torch.float16, torch.bfloat16, torch.float32) or kv_quant.is_fp8(dtype)
    if name in BLOCK_SCALED_KV_DTYPES or not plain:
        raise HelixPoolError(f"--kv-cache-dtype {name or dtype}: Helix pools store plain or fp8 "
                             f"(per-tensor scale) KV pages, not block-scaled ones; use "
                             f"--kv-cache-dtype auto, bf16, fp8_e4m3 or fp8_e5m2 with --enable-helix")


def build_helix_pool(kvc: Any, cfg: HelixConfig, logical_size: int):
    """The Helix KV pool of this rank for a KVCacheConfigurator `kvc` (logical capacity)."""
    from sglang.srt.runtime_context import get_exec

    _check_plain_model(kvc)
    check_kv_dtype(kvc)
    rank = _rank_of(cfg)
    common = dict(page_size=kvc.page_size, dtype=kvc.kv_cache_dtype,
                  layer_num=kvc.layer_info.num_effective_layers, device=kvc.device,
                  enable_memory_saver=get_exec().features.enable_memory_saver,
                  start_layer=kvc.layer_info.start_layer, end_layer=kvc.layer_info.end_layer,
                  kvp=cfg.kvp, kvp_rank=cfg.kvp_rank(rank))
    mc = kvc.model_config
    if kvc.use_mla_backend:
        return HelixMLATokenToKVPool(logical_size, kv_lora_rank=mc.kv_lora_rank,
                                     qk_rope_head_dim=mc.qk_rope_head_dim, **common)
    return HelixMHATokenToKVPool(logical_size, head_num=cfg.kv_heads_per_tpa, head_dim=mc.head_dim,
                                 v_head_dim=mc.v_head_dim, enable_alt_stream=False, **common)


def _bytes_per_token(kvc: Any, heads: int) -> int:
    mc = kvc.model_config
    itemsize = torch._utils._element_size(kvc.kv_cache_dtype)
    if kvc.use_mla_backend:
        return (mc.kv_lora_rank + mc.qk_rope_head_dim) * itemsize
    return heads * (mc.head_dim + mc.v_head_dim) * itemsize


def logical_size_for(kvc: Any, cfg: HelixConfig, stock_tokens: int) -> int:
    """Logical capacity of the Helix pool in the per-rank bytes SGLang budgeted for
    `stock_tokens` rows of its own pool (deterministic: pool, allocator and the scheduler's
    capacity report agree)."""
    from sglang.srt.runtime_context import get_parallel

    stock_heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return helix_logical_tokens(stock_tokens, _bytes_per_token(kvc, stock_heads),
                                _bytes_per_token(kvc, cfg.kv_heads_per_tpa), kvc.page_size, cfg.kvp)


def cpu_fp8_refused(kvc: Any) -> bool:
    """SGLang's configure would refuse this KV dtype on this platform (CPU, fp8_e4m3)."""
    from sglang.srt.platforms import current_platform

    return current_platform.is_cpu() and kvc.kv_cache_dtype == torch.float8_e4m3fn


# id(configurator) -> its real KV dtype while _around_configure has it read as another one
_STEPPED_OVER: dict[int, torch.dtype] = {}


def _around_configure(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """Helix on, CPU, fp8_e4m3 KV: run configure past SGLang's CPU fp8 check ("CPU FP8 KV cache
    is only supported for MHA" / "requires Intel AMX support" / "requires the intel_amx attention
    backend"), which guards SGLang's own CPU attention kernels, not Helix's. That check is the
    first statement of configure and compares kv_cache_dtype: the dtype reads as another 1-byte
    fp8 type for that comparison only; _around_resolve_config restores it before the next step
    of configure reads it (and so does the return, whatever happens)."""
    if config_of_configurator(kvc) is None or not cpu_fp8_refused(kvc):
        return original(kvc, *args, **kwargs)
    return configure_past_cpu_fp8_check(original, kvc, *args, **kwargs)


def configure_past_cpu_fp8_check(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """Run configure with the kv dtype read as fp8_e5m2 by its first check only (see
    _around_configure; also the CPU engine's Helix-off fix, srt.cpu.fp8_kv_fix)."""
    real = kvc.kv_cache_dtype
    _STEPPED_OVER[id(kvc)] = real
    kvc.kv_cache_dtype = torch.float8_e5m2
    try:
        return original(kvc, *args, **kwargs)
    finally:
        _STEPPED_OVER.pop(id(kvc), None)
        kvc.kv_cache_dtype = real


def _around_resolve_config(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """The real KV dtype back before the pool is sized (see _around_configure)."""
    real = _STEPPED_OVER.pop(id(kvc), None)
    if real is not None:
        kvc.kv_cache_dtype = real
    return original(kvc, *args, **kwargs)


def _around_build_pool(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    cfg = config_of_configurator(kvc)
    if cfg is None:
        return original(kvc, *args, **kwargs)
    size = logical_size_for(kvc, cfg, kwargs["sizes"].max_total_num_tokens)
    pool = build_helix_pool(kvc, cfg, size)
    logger.info("sglang_helix: Helix KV pool %s, logical tokens %d, local rows %d (KVP rank %d/%d)",
                type(pool).__name__, size, pool.size, pool.kvp_rank, cfg.kvp)
    return pool


def _around_build_allocator(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    cfg = config_of_configurator(kvc)
    if cfg is None:
        return original(kvc, *args, **kwargs)
    pool = kwargs["token_to_kv_pool"]
    shared = kwargs.get("token_to_kv_pool_allocator")
    if shared is not None:  # a NEXTN draft worker: its own Helix pool, the target's allocator
        check_draft_pool(pool, shared)
        return original(kvc, *args, **kwargs)
    return HelixPagedAllocator(pool.logical_size, kvc.page_size, kvc.kv_cache_dtype, kvc.device, pool,
                               need_sort=_need_sort(), kvp=cfg.kvp)


def check_draft_pool(pool: Any, shared: Any) -> None:
    """A draft worker's Helix pool behind the target's shared allocator: every logical loc the
    allocator hands out must land on the same KVP rank's rows in both pools (same KVP layout, a
    logical capacity at least the allocator's), so the draft's KV follows the target's colours."""
    if not isinstance(shared, HelixPagedAllocator):
        raise HelixPoolError(f"the speculative draft worker shares a {type(shared).__name__}, not the "
                             f"target's HelixPagedAllocator: drop --speculative-algorithm")
    if (pool.kvp, pool.kvp_rank) != (shared.kvp, shared.get_kvcache().kvp_rank):
        raise HelixPoolError(f"draft pool KVP rank {pool.kvp_rank}/{pool.kvp} != the target's "
                             f"{shared.get_kvcache().kvp_rank}/{shared.kvp}")
    if pool.logical_size < shared.size:
        raise HelixPoolError(f"draft pool holds {pool.logical_size} logical tokens < the shared "
                             f"allocator's {shared.size}")


def _need_sort() -> bool:
    """SGLang sorts freed pages under PD disaggregation (as its own allocator branch does)."""
    from sglang.srt.runtime_context import get_disagg

    return get_disagg().disaggregation_mode in ("decode", "prefill")


def _around_logical_capacity(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    cfg = config_of_configurator(kvc)
    if cfg is None:
        return original(kvc, *args, **kwargs)
    return logical_size_for(kvc, cfg, kwargs["max_total_num_tokens"])


def _around_check_full_pool(original: Callable, checker: Any, ps: Any, *args: Any, **kwargs: Any):
    """SGLang's leak check needs every free page (as it does for its own sharded allocator);
    available_size() is the min-color admission floor, so swap in aggregate_free_size()."""
    allocator = getattr(checker, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, HelixPagedAllocator):
        ps = dataclasses.replace(ps, full_available_size=allocator.aggregate_free_size())
    return original(checker, ps, *args, **kwargs)


POOL_HOOKS = (
    HookSpec(CONFIGURE_TARGET, "AROUND", _around_configure),
    HookSpec(RESOLVE_TARGET, "AROUND", _around_resolve_config),
    HookSpec(POOL_TARGET, "AROUND", _around_build_pool),
    HookSpec(ALLOCATOR_TARGET, "AROUND", _around_build_allocator),
    HookSpec(CAPACITY_TARGET, "AROUND", _around_logical_capacity),
    HookSpec(LEAK_CHECK_TARGET, "AROUND", _around_check_full_pool),
)


# ----------------------------------------------------------------------------- server info


def helix_kv_state(allocator: Any) -> Optional[dict]:
    """Helix KV state for /server_info (None unless `allocator` is a HelixPagedAllocator).

    Free lists are identical on every rank (SPMD), so one rank reports all KVP ranks:
    per_kvp_rank[c] = {"kvp_rank", "total_pages", "free_pages", "used_pages"} of color c, plus
    "layout" (the HelixConfig), the logical capacity, the rows of one rank's pool (padding page
    excluded), and the KV bytes of one rank next to plain TP on the same N = KVP x TPA ranks:

    - kv_cache_dtype: the pages' dtype (e.g. "bfloat16", "float8_e4m3fn"); every byte count
      below is in it (fp8: 1 byte per element; pages are stored as uint8, as SGLang stores them).
    - kv_bytes_per_rank: bytes this rank's Helix pool really allocated: sum of numel x itemsize
      over its KV buffers (k_buffer + v_buffer, or the MLA kv_buffer; every layer, padding page
      included).
    - plain_tp_kv_bytes_per_token: KV bytes per token of one plain-TP rank (attention TP N, no
      Helix), from the model dims and dtype of this pool:
        MLA: (kv_lora_rank + qk_rope_head_dim) x itemsize x layers (latent replicated per rank);
        GQA: ceil(K / N) x (head_dim + v_head_dim) x itemsize x layers, K the model's KV heads:
        K / N when N divides K, one replicated head when N > K (SGLang's GPU path keeps
        max(1, K // N); its CPU engine pads K up to a multiple of N: also ceil(K / N)).
    - plain_tp_kv_bytes_per_rank: (logical_tokens + page_size) x plain_tp_kv_bytes_per_token,
      what a plain-TP rank allocates for the same logical capacity (SGLang's pools carry one
      padding page).

    Up to about one page per KVP rank, kv_bytes_per_rank = plain_tp_kv_bytes_per_rank x
    (K / TPA) / (KVP x ceil(K / N)): plain / KVP for MLA; equal for GQA with N <= K (plain TP
    already splits the KV heads N ways); plain x K / N for GQA with N > K.
    """
    if not isinstance(allocator, HelixPagedAllocator):
        return None
    cfg = state.current_config()
    pool = allocator.get_kvcache()
    counts = allocator.color_free_counts()
    per = allocator.per_color
    buffers = list(pool.kv_buffer) if cfg is not None and cfg.mla else list(pool.k_buffer) + list(pool.v_buffer)
    out = {
        "layout": None if cfg is None else {
            "kvp": cfg.kvp, "tpa": cfg.tpa, "world_size": cfg.world_size,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "mla": cfg.mla,
            "page_size": cfg.page_size, "comm_backend": cfg.comm_backend,
            "hopb_slices": cfg.hopb_slices, "mla_exchange": cfg.mla_exchange,
            "exchange_dtype": cfg.exchange_dtype},
        "page_size": allocator.page_size,
        "kv_cache_dtype": str(pool.dtype).removeprefix("torch."),
        "logical_tokens": int(allocator.size),
        "local_pool_rows": int(pool.size),
        "kv_bytes_per_rank": int(sum(t.numel() * t.element_size() for t in buffers)),
        "available_tokens": int(allocator.available_size()),
        "per_kvp_rank": [{"kvp_rank": c, "total_pages": per, "free_pages": n, "used_pages": per - n}
                         for c, n in enumerate(counts)],
    }
    if cfg is not None:
        if cfg.mla:
            per_layer = pool.kv_lora_rank + pool.qk_rope_head_dim
        else:
            per_layer = -(-cfg.num_kv_heads // cfg.world_size) * (pool.head_dim + pool.v_head_dim)
        per_token = per_layer * torch._utils._element_size(pool.store_dtype) * pool.layer_num
        out["plain_tp_kv_bytes_per_token"] = per_token
        out["plain_tp_kv_bytes_per_rank"] = (int(allocator.size) + allocator.page_size) * per_token
    return out
