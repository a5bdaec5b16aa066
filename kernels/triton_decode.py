"""Triton paged partial decode attention: GQA and absorbed MLA, returning (out, lse).

Layout (same as kernels/reference.py): page_table[b, i] is the physical page of local page i of
request b; token t of a request lives at cache[page_table[b, t // P], t % P]. The page table is
read once per token block, so pages may be shuffled arbitrarily.

Online softmax in fp32 with exp2: scores are pre-multiplied by scale * log2(e), the running max
`m2` and `lse2` are base 2, and lse = lse2 * ln(2) is converted once, at the store.

Split-KV (optional): with num_splits > 1 each request's tokens are cut into num_splits contiguous
pieces computed by separate programs; their partials go through the Triton LSE merge. That is
the same math as the Helix merge, one level down, and keeps the GPU busy at small batch.

FP8 pages (kernels/kv_quant.py): K/V tiles are loaded as fp8 and upcast to the query's dtype in
registers (exact); k_scale is folded into the softmax scale, v_scale multiplies the output.
Queries are never rounded to fp8 (SGLang's Triton MLA decode casts q to the KV dtype for an
fp8 x fp8 dot; Helix keeps q in the activation dtype).

Block sizes are constexpr powers of two >= 16 (tl.dot's minimum); real dims (D=40, R=48, Dr=8)
are handled with masks. Runs on CUDA and under TRITON_INTERPRET=1 on CPU tensors.

Every launch parameter that differs between the two (token block sizes, fp32 dot operands, tl.dot
precision, the split-KV choice, warps/stages) lives in one frozen `TritonConfig`, chosen by
device (`config_for`) and overridable per call, so tests run the exact GPU set on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_merge import merge_triton

LOG2E = 1.0 / math.log(2.0)
# triton.jit reads TRITON_INTERPRET when it decorates, i.e. at this import: CPU tensors only work
# if the variable was "1" by then.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: feed fp32 operands (interpreter bf16 workaround)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _online_step(qk2, mask_n, m2, s, acc, v, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One token block of the base-2 online softmax; qk2 [BH, BN] already scaled by log2(e)."""
    qk2 = tl.where(mask_n[None, :], qk2, float("-inf"))
    # The caller only visits blocks with >= 1 valid token, so m2_new is finite.
    m2_new = tl.maximum(m2, tl.max(qk2, axis=1))
    p = tl.exp2(qk2 - m2_new[:, None])
    alpha = tl.exp2(m2 - m2_new)
    s = s * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return m2_new, s, acc


@triton.jit
def _store_partial(O_ptrs, o_mask, LSE_ptrs, lse_mask, m2, s, acc):
    """out = acc / s (0 when no token), lse = lse2 * ln 2 (-inf when no token)."""
    live = s > 0
    out = tl.where(live[:, None], acc / tl.maximum(s, 1e-30)[:, None], 0.0)
    lse2 = tl.where(live, m2 + tl.log2(tl.maximum(s, 1e-30)), float("-inf"))
    tl.store(O_ptrs, out, mask=o_mask)
    tl.store(LSE_ptrs, lse2 * 0.6931471805599453, mask=lse_mask)  # ln(2): base 2 -> natural


@triton.jit
def _split_range(length, pid_s, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token range [start, end) of split pid_s; splits are BLOCK_N-aligned, later ones may be empty."""
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * per_split
    end = tl.minimum(start + per_split, length)
    return start, end


@triton.jit
def _gqa_decode_kernel(
    Q, K, V, PT, SL, O, LSE,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ptb,
    stride_os, stride_ob, stride_oh,
    stride_ls, stride_lb,
    scale_log2, v_scale, group, head_dim, head_dim_v,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (b, kv head, split): the `group` query heads sharing one KV head, as one tile."""
    pid_b = tl.program_id(0)
    pid_kh = tl.program_id(1)
    pid_s = tl.program_id(2)
    length = tl.load(SL + pid_b).to(tl.int32)
    start, end = _split_range(length, pid_s, NUM_SPLITS, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < group
    heads = pid_kh * group + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < head_dim_v

    q = tl.load(
        Q + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    m2 = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(PT + pid_b * stride_ptb + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(
            K + (page * stride_kp + slot * stride_kt + pid_kh * stride_kh)[:, None] + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(q.dtype)  # fp8 pages: upcast per tile (a no-op otherwise)
        v = tl.load(
            V + (page * stride_vp + slot * stride_vt + pid_kh * stride_vh)[:, None] + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        ).to(q.dtype)
        qk2 = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * scale_log2
        m2, s, acc = _online_step(qk2, mask_n, m2, s, acc, v, DOT_PRECISION, UPCAST)

    o_ptrs = O + pid_s * stride_os + pid_b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :]
    lse_ptrs = LSE + pid_s * stride_ls + pid_b * stride_lb + heads
    _store_partial(o_ptrs, mask_h[:, None] & mask_dv[None, :], lse_ptrs, mask_h, m2, s, acc * v_scale)


@triton.jit
def _mla_decode_kernel(
    QL, QR, KV, PT, SL, O, LSE,
    stride_qlb, stride_qlh,
    stride_qrb, stride_qrh,
    stride_kvp, stride_kvt,
    stride_ptb,
    stride_os, stride_ob, stride_oh,
    stride_ls, stride_lb,
    scale_log2, v_scale, num_heads, rank_r, rope_dim,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (b, head block, split). Score = q_latent . c_kv + q_rope . k_pe; value = c_kv."""
    pid_b = tl.program_id(0)
    pid_hb = tl.program_id(1)
    pid_s = tl.program_id(2)
    length = tl.load(SL + pid_b).to(tl.int32)
    start, end = _split_range(length, pid_s, NUM_SPLITS, BLOCK_N)

    heads = pid_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank_r
    offs_dr = tl.arange(0, BLOCK_DR)
    mask_dr = offs_dr < rope_dim

    ql = tl.load(
        QL + pid_b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :],
        mask=mask_h[:, None] & mask_r[None, :],
        other=0.0,
    )
    qr = tl.load(
        QR + pid_b * stride_qrb + heads[:, None] * stride_qrh + offs_dr[None, :],
        mask=mask_h[:, None] & mask_dr[None, :],
        other=0.0,
    )
    m2 = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(PT + pid_b * stride_ptb + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        tok = page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvt
        latent = tl.load(
            KV + tok[:, None] + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0
        ).to(ql.dtype)  # fp8 pages: upcast per tile (a no-op otherwise)
        rope = tl.load(
            KV + tok[:, None] + rank_r + offs_dr[None, :],
            mask=mask_n[:, None] & mask_dr[None, :],
            other=0.0,
        ).to(qr.dtype)
        qk = _dot(ql, tl.trans(latent), DOT_PRECISION, UPCAST)
        qk += _dot(qr, tl.trans(rope), DOT_PRECISION, UPCAST)
        m2, s, acc = _online_step(qk * scale_log2, mask_n, m2, s, acc, latent, DOT_PRECISION, UPCAST)

    o_ptrs = O + pid_s * stride_os + pid_b * stride_ob + heads[:, None] * stride_oh + offs_r[None, :]
    lse_ptrs = LSE + pid_s * stride_ls + pid_b * stride_lb + heads
    _store_partial(o_ptrs, mask_h[:, None] & mask_r[None, :], lse_ptrs, mask_h, m2, s, acc * v_scale)


def _block(n: int) -> int:
    """Power-of-two tile >= 16 (tl.dot's minimum) covering n."""
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the decode kernels: everything that differs between CPU and GPU runs.

    block_n_gqa / block_n_mla: tokens per loop step (powers of two >= 16); block_h_mla: query
        heads per MLA program.
    upcast: feed fp32 operands to tl.dot. The GPU feeds fp16/bf16 to the tensor cores as they are;
        the CPU interpreter needs fp32 for bf16 (triton 3.8 keeps bf16 as uint16 and np.matmul's
        the raw bits: errors ~1e10; see interpreter_bf16_dot for running upcast=False there).
    fp32_precision: tl.dot input_precision for fp32 inputs ("ieee": exact; "tf32" would round
        operands to 10 mantissa bits on Ampere+). fp16/bf16 operands are exact products anyway.
    num_sms: SMs the automatic split-KV choice fills (0: never split when num_splits is None);
        min_split_tokens / max_splits bound it.
    num_warps / num_stages: Triton launch options (None: Triton's default; the interpreter
        ignores both).
    """

    block_n_gqa: int = 64
    block_n_mla: int = 32
    block_h_mla: int = 16
    upcast: bool = False
    fp32_precision: str = "ieee"
    num_sms: int = 0
    min_split_tokens: int = 256
    max_splits: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n_gqa", "block_n_mla", "block_h_mla"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonConfig.{name}={value} must be a power of two >= 16")
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"TritonConfig.fp32_precision={self.fp32_precision!r}; use ieee, tf32 "
                             f"or tf32x3")
        if self.num_sms < 0 or self.min_split_tokens < 1 or self.max_splits < 1:
            raise ValueError(f"TritonConfig needs num_sms >= 0, min_split_tokens >= 1 and "
                             f"max_splits >= 1; got {self}")

    @classmethod
    def gpu(cls, num_sms: int = 132, **overrides) -> "TritonConfig":
        """The CUDA parameter set (num_sms: the device's SM count; 132 = H100 SXM)."""
        return cls(num_sms=num_sms, **overrides)

    @classmethod
    def cpu(cls, **overrides) -> "TritonConfig":
        """The interpreter parameter set: small token blocks, fp32 dot operands, no split."""
        return cls(**{"block_n_gqa": 16, "block_n_mla": 16, "upcast": True, **overrides})

    def splits(self, programs: int, capacity: int) -> int:
        """Split-KV count: ~2 waves of num_sms programs, each split >= min_split_tokens of capacity.

        capacity = max_pages * P bounds every request's length, so no host sync is needed and the
        count stays fixed while a captured CUDA graph's page table keeps its width.
        """
        if self.num_sms == 0:
            return 1
        want = triton.cdiv(2 * self.num_sms, max(programs, 1))
        return int(max(1, min(want, triton.cdiv(capacity, self.min_split_tokens), self.max_splits)))

    def dot_precision(self, dtype: torch.dtype) -> str:
        return self.fp32_precision if dtype == torch.float32 else "tf32"

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {k: v for k, v in opts.items() if v is not None}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def config_for(device: torch.device) -> TritonConfig:
    """TritonConfig.gpu (with the device's SM count) on CUDA, TritonConfig.cpu elsewhere."""
    if device.type != "cuda":
        return TritonConfig.cpu()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return TritonConfig.gpu(num_sms=_sm_count(index))


@contextlib.contextmanager
def interpreter_bf16_dot():
    """Under TRITON_INTERPRET=1: make tl.dot read bf16 operands as numbers, for this block.

    Widens bf16 (stored as uint16 by the interpreter) to fp32 exactly before np.matmul, which is
    what the tensor cores compute (exact products, fp32 accumulation). Lets tests and the CPU
    dry-run of scripts/gpu_check.py run TritonConfig.gpu() (upcast=False) on bf16. Test aid only.
    """
    import numpy as np  # noqa: PLC0415
    from triton.runtime import interpreter  # noqa: PLC0415

    builder, original = interpreter.InterpreterBuilder, interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original


def _outputs(splits: int, bsz: int, heads: int, dv: int, dtype: torch.dtype, device: torch.device):
    """Partial buffers [S, B, H, Dv] / [S, B, H]; fp32 when they still go through the merge."""
    out_dtype = dtype if splits == 1 else torch.float32
    out = torch.empty(splits, bsz, heads, dv, dtype=out_dtype, device=device)
    lse = torch.empty(splits, bsz, heads, dtype=torch.float32, device=device)
    return out, lse


def _prepare(page_table, seq_lens, num_splits, config, device, programs, capacity):
    """Contiguous index tensors (the kernels read page-table columns with unit stride; tables
    are small), the config for `device` unless given, and the split count."""
    cfg = config or config_for(device)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    splits = int(num_splits) if num_splits is not None else cfg.splits(programs, capacity)
    return page_table.contiguous(), seq_lens.contiguous(), cfg, splits


def _finish(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    if out.shape[0] == 1:
        return out[0], lse[0]
    return merge_triton(out, lse, out_dtype=dtype)


def gqa_partial_triton(q, k_cache, v_cache, page_table, seq_lens, scale, num_splits=None, config=None,
                       k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None):
    """Partial GQA decode attention (contract of reference.gqa_partial_ref).

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv] (last dims
    contiguous; q's dtype or fp8 with per-tensor k_scale / v_scale); page_table: [B, max_pages]
    int32/int64; seq_lens: [B] int.
    num_splits: split-KV count (None: config.splits); config: TritonConfig (None: config_for).
    Returns out [B, Hq, Dv] in out_dtype (default q.dtype) and lse [B, Hq] fp32 natural log
    (0 / -inf when empty).
    """
    bsz, hq, d = q.shape
    page_size, kh, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    group = hq // kh
    page_table, seq_lens, cfg, splits = _prepare(
        page_table, seq_lens, num_splits, config, q.device, bsz * kh, page_table.shape[1] * page_size
    )
    dtype = out_dtype or q.dtype
    out, lse = _outputs(splits, bsz, hq, dv, dtype, q.device)
    if bsz == 0:
        return _finish(out, lse, dtype)
    _gqa_decode_kernel[(bsz, kh, splits)](
        q, k_cache, v_cache, page_table, seq_lens, out, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        scale * k_scale * LOG2E, float(v_scale), group, d, dv,
        PAGE_SIZE=page_size,
        NUM_SPLITS=splits,
        BLOCK_H=_block(group),
        BLOCK_N=cfg.block_n_gqa,
        BLOCK_D=_block(d),
        BLOCK_DV=_block(dv),
        DOT_PRECISION=cfg.dot_precision(q.dtype),
        UPCAST=cfg.upcast,
        **cfg.launch_options(),
    )
    return _finish(out, lse, dtype)


def mla_partial_triton(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, num_splits=None, config=None,
                       k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None):
    """Partial absorbed-MLA decode attention (contract of reference.mla_partial_ref).

    q_latent: [B, H, R]; q_rope: [B, H, Dr]; kv_cache: [num_pages, P, R + Dr] (q's dtype, or fp8:
    k_scale for the scores, v_scale for the values);
    page_table: [B, max_pages]; seq_lens: [B]. num_splits, config: as gqa_partial_triton.
    Returns out [B, H, R] in out_dtype (default q_latent.dtype) and lse [B, H] fp32 natural log.
    """
    bsz, heads, rank_r = q_latent.shape
    rope_dim = q_rope.shape[-1]
    page_size = kv_cache.shape[1]
    cfg = config or config_for(q_latent.device)
    head_blocks = triton.cdiv(heads, cfg.block_h_mla)
    capacity = page_table.shape[1] * page_size
    page_table, seq_lens, cfg, splits = _prepare(
        page_table, seq_lens, num_splits, cfg, q_latent.device, bsz * head_blocks, capacity
    )
    dtype = out_dtype or q_latent.dtype
    out, lse = _outputs(splits, bsz, heads, rank_r, dtype, q_latent.device)
    if bsz == 0:
        return _finish(out, lse, dtype)
    _mla_decode_kernel[(bsz, head_blocks, splits)](
        q_latent, q_rope, kv_cache, page_table, seq_lens, out, lse,
        q_latent.stride(0), q_latent.stride(1),
        q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        page_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        scale * k_scale * LOG2E, float(v_scale), heads, rank_r, rope_dim,
        PAGE_SIZE=page_size,
        NUM_SPLITS=splits,
        BLOCK_H=cfg.block_h_mla,
        BLOCK_N=cfg.block_n_mla,
        BLOCK_R=_block(rank_r),
        BLOCK_DR=_block(rope_dim),
        DOT_PRECISION=cfg.dot_precision(q_latent.dtype),
        UPCAST=cfg.upcast,
        **cfg.launch_options(),
    )
    return _finish(out, lse, dtype)
