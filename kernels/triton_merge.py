"""Triton LSE merge of partial attention results (the step after the all-to-all).

outs [S, B, H, Dv] + lses [S, B, H] (natural log) -> out [B, H, Dv] in outs' dtype and
lse [B, H] fp32. Weights use exp2 internally: lse2 = lse * log2(e), converted back once at the
store. A row whose partials are all -inf gives out 0 and lse -inf (no NaN).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


@triton.jit
def _merge_kernel(
    OUTS, LSES, OUT, LSE_OUT,
    stride_os, stride_ob, stride_oh,
    stride_ls, stride_lb,
    stride_mb, stride_mh,
    num_heads, num_shards, head_dim_v,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per (b, h): weights w_s = 2^(lse2_s - max) / sum, out = sum_s w_s o_s."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < num_shards
    mask_d = offs_d < head_dim_v

    lse = tl.load(LSES + offs_s * stride_ls + pid_b * stride_lb + pid_h, mask=mask_s, other=float("-inf"))
    lse2 = lse.to(tl.float32) * 1.4426950408889634  # log2(e)
    max2 = tl.max(lse2, axis=0)
    # All shards empty: shift by 0 so every weight is 2^-inf = 0 instead of NaN.
    max2 = tl.where(max2 == float("-inf"), 0.0, max2)
    w = tl.exp2(lse2 - max2)
    total = tl.sum(w, axis=0)
    live = w > 0
    # An empty shard's out is 0 by contract; masking its load keeps garbage or NaN out anyway.
    o_ptrs = OUTS + offs_s[:, None] * stride_os + pid_b * stride_ob + pid_h * stride_oh + offs_d[None, :]
    o = tl.load(o_ptrs, mask=(mask_s & live)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(w[:, None] * o, axis=0)
    out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    lse2_out = tl.where(total > 0, max2 + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
    tl.store(OUT + pid_b * stride_mb + pid_h * stride_mh + offs_d, out, mask=mask_d)
    tl.store(LSE_OUT + pid_b * num_heads + pid_h, lse2_out * 0.6931471805599453)  # ln(2)


def merge_triton(outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None):
    """LSE-weighted merge.

    outs: [S, B, H, Dv] (last dim contiguous); lses: [S, B, H] natural log (-inf = empty shard).
    Returns out [B, H, Dv] in out_dtype (default outs.dtype) and lse [B, H] fp32.
    """
    shards, bsz, heads, dv = outs.shape
    lses = lses.float().contiguous()
    out = torch.empty(bsz, heads, dv, dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty(bsz, heads, dtype=torch.float32, device=outs.device)
    if bsz * heads == 0:
        return out, lse
    _merge_kernel[(bsz, heads)](
        outs, lses, out, lse,
        outs.stride(0), outs.stride(1), outs.stride(2),
        lses.stride(0), lses.stride(1),
        out.stride(0), out.stride(1),
        heads, shards, dv,
        BLOCK_S=triton.next_power_of_2(max(shards, 1)),
        BLOCK_DV=triton.next_power_of_2(dv),
    )
    return out, lse
