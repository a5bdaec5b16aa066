"""Tensor input checks of the attention entry points (sglang_helix.attention) and the Triton
extend inputs (sglang_helix.kernel_path): shapes, dtypes (fp8 KV pages included), devices,
page-table capacity. Every message names the argument and the fix."""

from __future__ import annotations

import math

import torch

from .kernels import kv_quant

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32 (cast with .to())")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; "
            f"cast {name} to {like.dtype} (the kernels take one compute dtype)"
        )


def check_kv(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """KV pages: `like`'s dtype, or fp8 pages (kv_quant; read with k_scale / v_scale)."""
    if kv_quant.is_fp8(t.dtype):
        return
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use {like_name}'s dtype or an fp8 dtype "
                        f"(--kv-cache-dtype fp8_e4m3 / fp8_e5m2 pages)")
    check_float(name, t, like, like_name)


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use int32 or int64 (e.g. {name}.to(torch.int32))")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride(-1) == 1), got stride {t.stride()}; "
            f"pass {name}.contiguous()"
        )


def check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}; move them with .to(device)")


def check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float (e.g. head_dim ** -0.5), got {scale!r}")


def check_table(
    page_table: torch.Tensor, seq_lens: torch.Tensor, bsz: int, page_size: int, q_name: str, lengths: bool
) -> None:
    """page_table [B, max_pages], seq_lens [B], and (if `lengths`) every length fits the table."""
    check_tensor("page_table", page_table, 2, "[B, max_pages]")
    check_tensor("seq_lens", seq_lens, 1, "[B]")
    check_index("page_table", page_table)
    check_index("seq_lens", seq_lens)
    if page_table.shape[0] != bsz:
        raise ValueError(
            f"page_table has {page_table.shape[0]} rows but {q_name} has batch size B={bsz}; "
            f"one page-table row per request"
        )
    if seq_lens.shape[0] != bsz:
        raise ValueError(f"seq_lens has shape {tuple(seq_lens.shape)} but {q_name} has B={bsz}; need [B]")
    if bsz == 0 or not lengths:
        return
    lo, hi = (int(x) for x in torch.aminmax(seq_lens))  # host sync: plan-time check in production
    if lo < 0:
        raise ValueError(f"seq_lens must be >= 0, got min {lo}")
    capacity = page_table.shape[1] * page_size
    if hi > capacity:
        raise ValueError(
            f"seq_lens max {hi} exceeds page_table capacity max_pages x page_size = "
            f"{page_table.shape[1]} x {page_size} = {capacity}; widen page_table to "
            f">= {-(-hi // page_size)} columns"
        )


def validate_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, lengths: bool) -> None:
    check_tensor("q", q, 3, "[B, Hq, D]")
    check_tensor("k_cache", k_cache, 4, "[num_pages, P, Kh, D]")
    check_tensor("v_cache", v_cache, 4, "[num_pages, P, Kh, Dv]")
    check_float("q", q)
    check_kv("k_cache", k_cache, q, "q")
    check_kv("v_cache", v_cache, q, "q")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    bsz, hq, d = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on "
            f"[num_pages, P, Kh]"
        )
    kh = k_cache.shape[2]
    if kh == 0 or hq % kh:
        raise ValueError(
            f"q has Hq={hq} heads, not divisible by Kh={kh} KV heads of k_cache; each query head "
            f"group must map to one KV head (Hq = group x Kh)"
        )
    if k_cache.shape[3] != d:
        raise ValueError(f"q head dim D={d} != k_cache head dim {k_cache.shape[3]}; they must match")
    check_scale(scale)
    check_devices(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_contiguous(name, t)
    check_table(page_table, seq_lens, bsz, k_cache.shape[1], "q", lengths)


def validate_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, lengths: bool) -> None:
    check_tensor("q_latent", q_latent, 3, "[B, H, R]")
    check_tensor("q_rope", q_rope, 3, "[B, H, Dr]")
    check_tensor("kv_cache", kv_cache, 3, "[num_pages, P, R + Dr]")
    check_float("q_latent", q_latent)
    check_float("q_rope", q_rope, q_latent, "q_latent")
    check_kv("kv_cache", kv_cache, q_latent, "q_latent")
    bsz, heads, rank_r = q_latent.shape
    if q_rope.shape[:2] != (bsz, heads):
        raise ValueError(
            f"q_rope shape {tuple(q_rope.shape)} must match q_latent's [B, H] = [{bsz}, {heads}]"
        )
    width = rank_r + q_rope.shape[2]
    if kv_cache.shape[2] != width:
        raise ValueError(
            f"kv_cache last dim {kv_cache.shape[2]} != R + Dr = {rank_r} + {q_rope.shape[2]} = {width} "
            f"(latent c_kv then rotary k_pe)"
        )
    check_scale(scale)
    check_devices(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, page_table=page_table, seq_lens=seq_lens)
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        check_last_contiguous(name, t)
    check_table(page_table, seq_lens, bsz, kv_cache.shape[1], "q_latent", lengths)


def validate_merge(outs, lses) -> None:
    check_tensor("outs", outs, 4, "[S, B, H, Dv]")
    check_tensor("lses", lses, 3, "[S, B, H]")
    check_float("outs", outs)
    check_float("lses", lses)
    if lses.shape != outs.shape[:3]:
        raise ValueError(
            f"lses shape {tuple(lses.shape)} must equal outs' [S, B, H] = {tuple(outs.shape[:3])}"
        )
    if outs.shape[0] < 1:
        raise ValueError("outs must hold at least one partial (S >= 1)")
    check_devices(outs=outs, lses=lses)
    check_last_contiguous("outs", outs)
