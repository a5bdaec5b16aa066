"""Helix state in SGLang's /server_info (internal_states[i]["helix"] and ["helix_pd"]): the AFTER
hook on `SchedulerInternalStateController._add_memory_usage` (srt.hook_table) and the formatting
of what it reports (per-KVP-rank KV state, HiCache host pages, speculative counters, PD
transfers)."""

from __future__ import annotations

from typing import Any, Optional

from ..kv_size import KVShape, itemsize, pool_bytes
from . import state
from .memory.allocator import HelixPagedAllocator
from .memory.host_hooks import helix_host_pool
from .pd import SERVER_INFO_KEY as PD_KEY, pd_transfer_state

SERVER_INFO_KEY = "helix"
SPEC_KEY = "spec"
HOST_KEY = "host"  # the HiCache host tier (--enable-hierarchical-cache)


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

    - mixed_batches: extend batches this rank planned with decode rows beside chunk rows
      (--enable-mixed-chunk: one exchange for both).
    - parallel: where this Helix group sits (`parallel_layout`): its attention group among the
      world's (DP-attention groups x PP stages), the DP-attention / PP / DP-replica sizes and
      ranks, --tp-size, and the layers [start, end) this pool holds pages of (one PP stage's).

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
        "parallel": parallel_layout(pool),
        "mixed_batches": rt.mixed_batches if (rt := state.runtime()) is not None else 0,
    }
    if cfg is not None:
        per_token = KVShape.of(pool, mla=cfg.mla, layers=pool.layer_num, num_kv_heads=cfg.num_kv_heads
                               ).bytes_per_token(itemsize(pool.store_dtype), ranks=cfg.world_size)
        out["plain_tp_kv_bytes_per_token"] = per_token
        out["plain_tp_kv_bytes_per_rank"] = pool_bytes(int(allocator.size), allocator.page_size, per_token)
    return out


def parallel_layout(pool: Any) -> dict:
    """This Helix group's place in SGLang's layout: attention group a of the world's attention
    groups (blocks of N = KVP x TPA ranks: DP-attention groups x PP stages, each one Helix group),
    the DP-attention and PP sizes and this scheduler's ranks, its `dp_rank` (the rank SGLang's DP
    controller spawned it with: a --dp-size replica; None without a DP controller), --tp-size (the
    FFN's TP x EP ranks per stage), and the model layers [start, end) this pool holds pages of
    (one PP stage's)."""
    from sglang.srt.runtime_context import get_parallel

    par, rt = get_parallel(), state.runtime()
    return {
        "attention_group": rt.attention_group if rt is not None else 0,
        "attention_groups": rt.attention_groups if rt is not None else 1,
        "tp_size": _width(par, "tp_size"),
        "attn_dp_size": _width(par, "attn_dp_size"),
        "attn_dp_rank": _width(par, "attn_dp_rank", 0),
        "pp_size": _width(par, "pp_size"),
        "pp_rank": _width(par, "pp_rank", 0),
        "dp_rank": _width(par, "dp_rank", None),
        # from layer_num: SGLang passes the pool an exclusive end_layer (the model's PP range)
        # but defaults it to the last layer (inclusive) when none is passed
        "layers": [int(pool.start_layer), int(pool.start_layer) + int(pool.layer_num)],
    }


def _width(par: Any, name: str, default: Optional[int] = 1) -> Optional[int]:
    """get_parallel().<name>, or `default` where this process never published it."""
    try:
        value = getattr(par, name)
    except (AttributeError, RuntimeError, ValueError):
        return default
    return default if value is None else int(value)


def speculative_counts(scheduler: Any) -> Optional[dict]:
    """Speculative verify counters of `scheduler`, current to the last decode batch (None when
    speculative decoding is off).

    SGLang's own `avg_spec_accept_length` (same internal state) folds its per-interval counters
    into the lifetime totals only when it logs a decode batch (every `--decode-log-interval`
    batches, 40 by default), so it is absent before the first log and lags after it. Here the
    open interval is added, so a client can diff two readings around one run:

    - verify_steps: request-steps verified (each decode batch adds its batch size);
    - accept_tokens: tokens those steps committed (accepted drafts + the bonus token each);
    - avg_accept_length: accept_tokens / verify_steps (None before the first verify step).
    """
    algo = getattr(scheduler, "spec_algorithm", None)
    reporter = getattr(scheduler, "metrics_reporter", None)
    if algo is None or algo.is_none() or reporter is None:
        return None
    steps = int(reporter.spec_total_num_forward_ct + reporter.spec_num_forward_ct)
    tokens = int(reporter.spec_total_num_accept_tokens + reporter.spec_num_accept_tokens)
    return {"verify_steps": steps, "accept_tokens": tokens,
            "avg_accept_length": tokens / steps if steps > 0 else None}


def _after_add_memory_usage(result: Any, controller: Any, state: dict, *args: Any, **kwargs: Any) -> None:
    """Adds state["helix"] (layout + per-KVP-rank KV usage, the speculative counters when
    speculative decoding is on, the HiCache host tier's per-KVP-rank host pages when HiCache is
    on) and, behind PD, state["helix_pd"]."""
    scheduler = getattr(controller, "scheduler", None)
    kv = helix_kv_state(getattr(scheduler, "token_to_kv_pool_allocator", None))
    if kv is not None:
        spec = speculative_counts(scheduler)
        if spec is not None:
            kv[SPEC_KEY] = spec
        host = helix_host_pool(getattr(getattr(scheduler, "tree_cache", None), "cache_controller", None))
        if host is not None:
            kv[HOST_KEY] = host.state()
        state[SERVER_INFO_KEY] = kv
    transfers = pd_transfer_state()
    if transfers is not None:
        state[PD_KEY] = transfers
    return None
