"""FP8 KV pages (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): every partial-attention path reads fp8
pages against the fp32 references fed the dequantized values, and never dequantizes a pool.

- kv_quant: SGLang's store convention (x / scale, cast; never in place) and its inverse;
- decode: torch and Triton (TRITON_INTERPRET=1; the interpreter's parameters and the exact GPU
  set) for GQA and absorbed MLA, e4m3 and e5m2 pages, fp32 / bf16 / fp16 queries, scales 1 and
  non-trivial k_scale != v_scale, NaN in every slot no kernel may read;
- extend: the causal chunk over fp8 K/V and the paged prefix partial over fp8 pages, torch and
  Triton, GQA and an MLA-like latent (values a view of the keys);
- a round trip through fp8 stays within each fp8 dtype's own rounding of the unquantized
  attention (per-dtype tolerances);
- no whole pool dequantized: a large pool with few used pages, every torch op recorded: no
  floating tensor (other than fp8) of the pool's size or more appears, on any path;
- refusals: a non-float, non-fp8 cache; explicit MLA library impls with fp8 pages.
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix.attention import (
    chunk_attention_lse,
    partial_attention_gqa,
    partial_attention_mla,
    prefix_attention_lse,
)
from sglang_helix.dev.paged import build_local_paged_cache
from sglang_helix.kernels import kv_quant
from sglang_helix.kernels.reference import attention_lse_ref, gqa_partial_ref, mla_partial_ref
from sglang_helix.kernels.triton_decode import (
    TritonConfig,
    gqa_partial_triton,
    interpreter_bf16_dot,
    mla_partial_triton,
)
from sglang_helix.metadata import plan_extend

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# kernel (fp8 pages) vs the fp32 reference on the dequantized pages: the fp8 values are exact in
# every query dtype, so the tolerance is the query dtype's (out carries one rounding of it).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
LSE_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
# fp8 round trip vs the unquantized attention, relative L2 error (3 / 2 mantissa bits: measured
# 0.03-0.07 / 0.06-0.11 over seeds; reading with the wrong scales gives 0.4-0.7)
ROUND_TRIP = {torch.float8_e4m3fn: 0.12, torch.float8_e5m2: 0.2}
SCALES = [(1.0, 1.0), (0.37, 1.9)]
P = 4
LENS = [0, 13, 30, 6]


def _paged(lens, width_shape, kv_dtype, scale, seed, spare=3):
    """Tokens of each request quantized (x / scale, cast) into shuffled pages of a NaN-filled
    fp8 cache. Returns cache [pages, P, *width], page_table [B, max_pages + 1] (-1 past the end),
    seq_lens [B] int32."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // P) for n in lens]
    perm = torch.randperm(sum(n_pages) + spare, generator=g)
    cache = torch.full((len(perm), P, *width_shape), float("nan")).to(kv_dtype)
    table = torch.full((len(lens), max(n_pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        tokens = kv_quant.quantize(torch.randn(n, *width_shape, generator=g) * 2, kv_dtype, scale)
        for i in range(n_pages[b]):
            table[b, i] = phys = int(perm[used])
            used += 1
            chunk = tokens[i * P:(i + 1) * P]
            cache[phys, :len(chunk)] = chunk
    return cache, table, torch.tensor(lens, dtype=torch.int32)


def _gqa(kv_dtype, q_dtype, ks, vs, hq=4, kh=2, d=40, dv=24, seed=0):
    kc, pt, sl = _paged(LENS, (kh, d), kv_dtype, ks, seed)
    vc, _, _ = _paged(LENS, (kh, dv), kv_dtype, vs, seed)  # same seed: same page layout
    q = torch.randn(len(LENS), hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(q_dtype)
    return q, kc, vc, pt, sl


def _mla(kv_dtype, q_dtype, ks, heads=5, rank_r=48, rope=8, seed=0):
    kv, pt, sl = _paged(LENS, (rank_r + rope,), kv_dtype, ks, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ql = torch.randn(len(LENS), heads, rank_r, generator=g).to(q_dtype)
    qr = torch.randn(len(LENS), heads, rope, generator=g).to(q_dtype)
    return ql, qr, kv, pt, sl


def _close(got, want, q_dtype):
    (out, lse), (ref_out, ref_lse) = got, want
    assert out.dtype in (q_dtype, torch.float32) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (out[empty] == 0).all()
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[q_dtype])
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=LSE_TOL[q_dtype], rtol=0)


def _gqa_ref(q, kc, vc, pt, sl, scale, ks, vs):
    """fp32 reference on the dequantized pages (scales applied to the values, not folded)."""
    return gqa_partial_ref(q, kv_quant.dequantize(kc, ks), kv_quant.dequantize(vc, vs), pt, sl, scale)


def _mla_ref(ql, qr, kv, pt, sl, scale, ks, vs):
    """MLA: the latent scaled by k_scale for the scores; the values by v_scale (SGLang's read)."""
    out, lse = mla_partial_ref(ql, qr, kv_quant.dequantize(kv, ks), pt, sl, scale)
    return out * (vs / ks), lse  # same softmax weights, values rescaled from k_scale to v_scale


# ------------------------------------------------------------------------- store convention


def test_quantize_is_sglangs_store_and_never_in_place():
    x = torch.tensor([1.0, -3.0, 0.3])
    kept = x.clone()
    y = kv_quant.quantize(x, torch.float8_e4m3fn, torch.tensor(0.5))
    assert torch.equal(x, kept)  # SGLang's pool divides the caller's tensor in place; Helix does not
    assert y.dtype == torch.float8_e4m3fn and torch.equal(y, (x / 0.5).to(torch.float8_e4m3fn))
    assert torch.equal(kv_quant.dequantize(y, 0.5), y.float() * 0.5)
    assert kv_quant.check_scale("k_scale", None) == 1.0
    for bad, err in ((0.0, ValueError), (float("nan"), ValueError), (torch.tensor(1.0), TypeError)):
        with pytest.raises(err, match="k_scale"):
            kv_quant.check_scale("k_scale", bad)


# ------------------------------------------------------------------------- decode


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_dtype", list(TOL))
@pytest.mark.parametrize("ks, vs", SCALES)
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_gqa_decode_reads_fp8_pages(kv_dtype, q_dtype, ks, vs, impl):
    q, kc, vc, pt, sl = _gqa(kv_dtype, q_dtype, ks, vs)
    got = partial_attention_gqa(q, kc, vc, pt, sl, 0.3, impl=impl, k_scale=ks, v_scale=vs)
    _close(got, _gqa_ref(q, kc, vc, pt, sl, 0.3, ks, vs), q_dtype)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_dtype", list(TOL))
@pytest.mark.parametrize("ks, vs", SCALES)
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_mla_decode_reads_fp8_pages(kv_dtype, q_dtype, ks, vs, impl):
    ql, qr, kv, pt, sl = _mla(kv_dtype, q_dtype, ks)
    got = partial_attention_mla(ql, qr, kv, pt, sl, 0.2, impl=impl, k_scale=ks, v_scale=vs)
    _close(got, _mla_ref(ql, qr, kv, pt, sl, 0.2, ks, vs), q_dtype)


@pytest.mark.triton
@pytest.mark.parametrize("kv_dtype", FP8)
def test_triton_decode_gpu_params_and_splits(kv_dtype):
    """The exact GPU parameter set (bf16 dot operands: fp8 tiles upcast to bf16 in registers,
    then tl.dot) and split-KV (partials merged in fp32) on fp8 pages."""
    ks, vs = SCALES[1]
    q, kc, vc, pt, sl = _gqa(kv_dtype, torch.bfloat16, ks, vs)
    ql, qr, kv, mpt, msl = _mla(kv_dtype, torch.bfloat16, ks)
    gpu = TritonConfig.gpu(block_n_gqa=16, block_n_mla=16)
    with interpreter_bf16_dot():
        for splits in (1, 3):
            _close(gqa_partial_triton(q, kc, vc, pt, sl, 0.3, splits, gpu, k_scale=ks, v_scale=vs),
                   _gqa_ref(q, kc, vc, pt, sl, 0.3, ks, vs), torch.bfloat16)
            _close(mla_partial_triton(ql, qr, kv, mpt, msl, 0.2, splits, gpu, k_scale=ks, v_scale=vs),
                   _mla_ref(ql, qr, kv, mpt, msl, 0.2, ks, vs), torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_fp8_round_trip_stays_near_unquantized_attention(kv_dtype):
    """Store with SGLang's convention (scale 0.37 / 1.9), read with it: the attention output is
    the unquantized one up to the fp8 dtype's rounding (a wrong scale convention is off by far
    more)."""
    g = torch.Generator().manual_seed(3)
    ks, vs = SCALES[1]
    k, v = torch.randn(1, 24, 2, 16, generator=g), torch.randn(1, 24, 2, 16, generator=g)
    q, pt, sl = torch.randn(1, 4, 16, generator=g), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([24])
    k8, v8 = (kv_quant.quantize(x, kv_dtype, s) for x, s in ((k, ks), (v, vs)))
    out, _ = gqa_partial_ref(q, k, v, pt, sl, 0.25)
    errs = [float((partial_attention_gqa(q, k8, v8, pt, sl, 0.25, impl="torch", k_scale=a, v_scale=b)[0]
                   - out).norm() / out.norm()) for a, b in ((ks, vs), (1.0, 1.0))]
    assert errs[0] <= ROUND_TRIP[kv_dtype] < 2 * ROUND_TRIP[kv_dtype] < errs[1], errs


# ------------------------------------------------------------------------- extend


def _prefix_case(kv_dtype, q_dtype, ks, vs, v_in_k, hq, hk, d, dv, kvp_rank):
    prefixes, extends, kvp = [0, 3, 9, 21], [2, 3, 1, 5], 2
    g = torch.Generator().manual_seed(5 + kvp_rank)
    width = d if v_in_k else d + dv
    kv = [torch.randn(max(p, 1), hk, width, generator=g) for p in prefixes]
    k8 = [kv_quant.quantize(x[..., :d], kv_dtype, ks) for x in kv]
    v8 = [x[..., :dv] for x in k8] if v_in_k else [kv_quant.quantize(x[..., d:], kv_dtype, vs) for x in kv]
    # one cache holding k | v as bytes; pages at shuffled slots, NaN where nothing may be read
    both = [torch.cat([a.view(torch.uint8), b.view(torch.uint8)], -1) if not v_in_k else a.view(torch.uint8)
            for a, b in zip(k8, v8)]
    cache, table = build_local_paged_cache(both, P, kvp, kvp_rank, fill=255)
    cache = cache.view(kv_dtype)
    k_pages = cache[..., :d]
    v_pages = cache[..., :dv] if v_in_k else cache[..., d:]
    plan = plan_extend(extends, prefixes, kvp_rank, P, kvp, local_tables=lambda _: (table, None))
    q = torch.randn(sum(extends), hq, d, generator=g).to(q_dtype)
    out = torch.zeros(q.shape[0], hq, dv)
    lse = torch.full(q.shape[:2], float("-inf"))
    for i, p in enumerate(prefixes):
        mine = torch.tensor([j for j in range(p) if (j // P) % kvp == kvp_rank], dtype=torch.long)
        if len(mine):
            sl = slice(plan.starts[i], plan.starts[i + 1])
            out[sl], lse[sl] = attention_lse_ref(q[sl], kv_quant.dequantize(k8[i][mine], ks),
                                                 kv_quant.dequantize(v8[i][mine], vs), 0.3)
    return q, k_pages, v_pages, plan, (out, lse)


EXTEND_SHAPES = {"gqa": (4, 2, 40, 24, False), "mla": (5, 1, 48, 32, True)}


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(EXTEND_SHAPES))
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_extend_chunk_and_prefix_read_fp8(kv_dtype, q_dtype, shape, impl):
    hq, hk, d, dv, v_in_k = EXTEND_SHAPES[shape]
    ks, vs = SCALES[1]
    g = torch.Generator().manual_seed(11)
    lens = [7, 1, 0, 12]
    q = torch.randn(sum(lens), hq, d, generator=g).to(q_dtype)
    k8 = kv_quant.quantize(torch.randn(sum(lens), hk, d, generator=g), kv_dtype, ks)
    v8 = k8[..., :dv] if v_in_k else kv_quant.quantize(torch.randn(sum(lens), hk, dv, generator=g), kv_dtype, vs)
    got = chunk_attention_lse(q, k8, v8, lens, 0.3, impl=impl, k_scale=ks, v_scale=vs)
    ref_out, ref_lse, start = [], [], 0
    for n in lens:
        sl = slice(start, start + n)
        o, l = attention_lse_ref(q[sl], kv_quant.dequantize(k8[sl], ks), kv_quant.dequantize(v8[sl], vs), 0.3, 0)
        ref_out.append(o)
        ref_lse.append(l)
        start += n
    _close(got, (torch.cat(ref_out), torch.cat(ref_lse)), q_dtype)
    for kvp_rank in (0, 1):
        q, k_pages, v_pages, plan, ref = _prefix_case(kv_dtype, q_dtype, ks, vs, v_in_k, hq, hk, d, dv, kvp_rank)
        _close(prefix_attention_lse(q, k_pages, v_pages, plan, 0.3, impl=impl, k_scale=ks, v_scale=vs), ref, q_dtype)


# ------------------------------------------------------------------------- no pool dequantized


class _LargestFloat(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest non-fp8 floating tensor any op inside the block produced (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not kv_quant.is_fp8(t.dtype):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_no_path_dequantizes_a_pool(impl):
    """A 2048-page fp8 pool of which a batch uses 9 pages: decode (GQA, MLA) and the extend
    prefix partial produce no floating tensor a fraction the pool's size (a dequantized pool,
    or any per-pool upcast, would be at least as large as the pool)."""
    pages, d, kh = 2048, 16, 2
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(pages, P, kh, d, generator=g).to(torch.float8_e4m3fn)
    vc = torch.randn(pages, P, kh, d, generator=g).to(torch.float8_e4m3fn)
    kv = torch.randn(pages, P, d + d // 2, generator=g).to(torch.float8_e4m3fn)
    pt = torch.tensor([[5, 700, 1999], [12, 13, 14], [40, 41, 2000]], dtype=torch.int32)
    sl = torch.tensor([9, 12, 10], dtype=torch.int32)
    q = torch.randn(3, 4, d, generator=g)
    plan = plan_extend([2, 3, 1], [9, 12, 10], 0, P, 1, local_tables=lambda _: (pt, None))
    bound = kc.numel() // 16
    with _LargestFloat() as seen:
        partial_attention_gqa(q, kc, vc, pt, sl, 0.3, impl=impl, k_scale=0.5, v_scale=2.0)
        partial_attention_mla(q, q[..., :d // 2].contiguous(), kv, pt, sl, 0.3, impl=impl)
        prefix_attention_lse(torch.randn(6, 4, d, generator=g), kc, vc, plan, 0.3, impl=impl, k_scale=0.5)
    assert 0 < seen.largest <= bound, (seen.largest, bound)
    with _LargestFloat() as seen:  # the check itself: a dequantized pool is caught
        kv_quant.dequantize(kc, 0.5)
    assert seen.largest > bound


# ------------------------------------------------------------------------- refusals


def test_refusals_name_the_kv_dtype():
    q, kc, vc, pt, sl = _gqa(torch.float8_e4m3fn, torch.float32, 1.0, 1.0)
    with pytest.raises(TypeError, match="fp8"):
        partial_attention_gqa(q, kc.view(torch.uint8), vc.view(torch.uint8), pt, sl, 0.3)
    with pytest.raises(TypeError, match="share a dtype"):
        partial_attention_gqa(q, kc, vc.float(), pt, sl, 0.3)
    with pytest.raises(ValueError, match="v_scale"):
        partial_attention_gqa(q, kc, vc, pt, sl, 0.3, v_scale=-1.0)
    ql, qr, kv, pt, sl = _mla(torch.float8_e4m3fn, torch.bfloat16, 1.0)
    for impl in ("flashinfer", "trtllm_mla"):
        with pytest.raises(ValueError, match="--kv-cache-dtype"):
            partial_attention_mla(ql, qr, kv, pt, sl, 0.2, impl=impl)
