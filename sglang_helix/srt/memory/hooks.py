"""Helix KV memory wired into SGLang 0.5.23's KVCacheConfigurator (pool, allocator, capacity,
leak check): the hook functions of the memory rows of srt.hook_table.

Each hook calls straight through unless the configurator's ServerArgs carries a HelixConfig.

FP8 KV (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): the pools store 1-byte pages and every byte count
follows the pool's dtype. SGLang 0.5.23's CPU engine refuses fp8_e4m3 KV at the top of
KVCacheConfigurator.configure (its CPU attention reads fp8 only through AMX kernels; MLA not at
all); under Helix the pools and kernels are the plugin's and read fp8 pages on any CPU, so
`_around_configure` steps over that one check (Helix on, CPU, fp8 only) with the CPU fp8-KV fix's
step (srt.cpu.fp8_kv_fix), and with Helix off hands configure to that fix (CPU engine only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch

from ...config import HelixConfig
from ...kernels import kv_quant
from ...kv_size import KVShape, itemsize
from ...rules.kv_cache import BLOCK_SCALED_KV_DTYPES
from ...sharding import helix_logical_tokens
from .. import state
from ..cpu import fp8_kv_fix
from .allocator import HelixPagedAllocator
from .pools import HelixMHATokenToKVPool, HelixMLATokenToKVPool, HelixPoolError

logger = logging.getLogger(__name__)

def config_of_configurator(configurator: Any) -> Optional[HelixConfig]:
    """The HelixConfig a KVCacheConfigurator's ServerArgs carries, or None (Helix off)."""
    return state.config_of(getattr(configurator, "server_args", None))


def _rank_of(cfg: HelixConfig) -> int:
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.attn_tp_size != cfg.world_size:  # the rules make them equal (--tp-size / DP attention)
        raise HelixPoolError(f"attention TP size {par.attn_tp_size} != KVP x TPA = {cfg.world_size}; "
                             f"set --tp-size to {cfg.world_size} x the DP-attention size")
    return par.attn_tp_rank  # the Helix rank g inside this rank's attention TP group


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
    """KV bytes of one token (one layer: SGLang sizes pools per layer) on one rank holding
    `heads` KV heads (GQA) or the latent (MLA)."""
    shape = KVShape.of(kvc.model_config, mla=kvc.use_mla_backend, layers=1, num_kv_heads=heads)
    return shape.bytes_per_token(itemsize(kvc.kv_cache_dtype))


def logical_size_for(kvc: Any, cfg: HelixConfig, stock_tokens: int) -> int:
    """Logical capacity of the Helix pool in the per-rank bytes SGLang budgeted for
    `stock_tokens` rows of its own pool (deterministic: pool, allocator and the scheduler's
    capacity report agree)."""
    from sglang.srt.runtime_context import get_parallel

    stock_heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return helix_logical_tokens(stock_tokens, _bytes_per_token(kvc, stock_heads),
                                _bytes_per_token(kvc, cfg.kv_heads_per_tpa), kvc.page_size, cfg.kvp)


def _around_configure(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """Helix on, CPU, fp8_e4m3 KV: configure runs past SGLang's CPU fp8 check ("CPU FP8 KV cache
    is only supported for MHA" / "requires Intel AMX support" / "requires the intel_amx attention
    backend"), which guards SGLang's own CPU attention kernels, not Helix's. Helix off: the CPU
    engine's fp8-KV fix decides (it calls SGLang's configure unchanged off the CPU engine)."""
    if config_of_configurator(kvc) is None:
        return fp8_kv_fix.configure_helix_off(original, kvc, *args, **kwargs)
    if not fp8_kv_fix.cpu_fp8_refused(kvc):
        return original(kvc, *args, **kwargs)
    return fp8_kv_fix.configure_past_cpu_fp8_check(original, kvc, *args, **kwargs)


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
