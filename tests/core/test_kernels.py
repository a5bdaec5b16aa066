"""Torch fast path and Triton kernels (TRITON_INTERPRET=1 on CPU) vs the fp32 references.

Caches are filled with NaN everywhere a kernel must not read (unused pages, slots past seq_len),
and physical pages are shuffled, so a wrong page lookup or an unmasked read fails loudly.
Triton shapes stay tiny: the interpreter runs every program in Python. Triton runs twice: with
the interpreter's own parameters (TritonConfig.cpu, what impl="triton" picks on CPU) and with the
exact GPU parameter set (TritonConfig.gpu); the "GPU parameters" section says what the interpreter
cannot cover.
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix import sharding as layout
from sglang_helix.attention import merge_partials, partial_attention_gqa, partial_attention_mla
from sglang_helix.kernels import (
    full_attention_ref,
    gqa_partial_ref,
    gqa_partial_torch,
    merge_ref,
    merge_triton,
    mla_partial_ref,
    mla_partial_torch,
)
from sglang_helix.kernels import torch_decode
from sglang_helix.kernels.triton_decode import (
    TritonConfig,
    config_for,
    gqa_partial_triton,
    interpreter_bf16_dot,
    mla_partial_triton,
)

# Per-dtype tolerances vs the fp32 reference fed the same (rounded) inputs.
# out: the kernels return q's dtype, so out carries one rounding of that dtype (plus, in Triton,
# probabilities rounded to it before p @ v). lse is accumulated in fp32 everywhere.
TOL = {
    torch.float32: dict(out_atol=2e-5, out_rtol=2e-5, lse_atol=2e-5),
    torch.float16: dict(out_atol=3e-3, out_rtol=3e-3, lse_atol=1e-4),
    torch.bfloat16: dict(out_atol=2.5e-2, out_rtol=2.5e-2, lse_atol=1e-4),
}
DTYPES = list(TOL)


def _paged(lens, page_size, make_tokens, seed):
    """Scatter each request's tokens into shuffled pages of a NaN-filled cache.

    make_tokens(n) -> [n, ...] token tensor. Returns cache [num_pages, P, ...], page_table
    [B, max_pages + 1] int32 (-1 past each request's pages) and seq_lens [B] int32.
    """
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // page_size) for n in lens]
    spare = 3  # never-referenced pages, left NaN
    total = sum(n_pages) + spare
    perm = torch.randperm(total, generator=gen)
    sample = make_tokens(1)
    cache = torch.full((total, page_size, *sample.shape[1:]), float("nan"), dtype=sample.dtype)
    table = torch.full((len(lens), max(n_pages, default=0) + 1), -1, dtype=torch.int32)
    used = 0
    for b, (n, np_) in enumerate(zip(lens, n_pages)):
        tokens = make_tokens(n)
        for i in range(np_):
            phys = int(perm[used])
            used += 1
            table[b, i] = phys
            chunk = tokens[i * page_size : (i + 1) * page_size]
            cache[phys, : chunk.shape[0]] = chunk  # tail slots stay NaN
    return cache, table, torch.tensor(lens, dtype=torch.int32)


def _gqa_problem(lens, page_size, hq, kh, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = lambda n: torch.randn(n, kh, d + dv, generator=gen).to(dtype)  # noqa: E731
    cache, table, seq_lens = _paged(lens, page_size, kv, seed)
    k_cache, v_cache = cache[..., :d].contiguous(), cache[..., d:].contiguous()
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, seq_lens


def _mla_problem(lens, page_size, heads, rank_r, rope, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = lambda n: torch.randn(n, rank_r + rope, generator=gen).to(dtype)  # noqa: E731
    cache, table, seq_lens = _paged(lens, page_size, kv, seed)
    q_latent = torch.randn(len(lens), heads, rank_r, generator=gen).to(dtype)
    q_rope = torch.randn(len(lens), heads, rope, generator=gen).to(dtype)
    return q_latent, q_rope, cache, table, seq_lens


def _assert_close(got, want, dtype):
    out, lse = got
    ref_out, ref_lse = want
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "empty rows must be exactly the -inf rows"
    assert (lse[empty] < 0).all() and (out[empty] == 0).all()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol["out_atol"], rtol=tol["out_rtol"])
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=tol["lse_atol"], rtol=0)


# ------------------------------------------------------------------------- torch fast path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_torch_gqa_matches_reference(dtype, page_size, group):
    kh, d, dv = 2, 40, 24
    q, kc, vc, pt, sl = _gqa_problem([0, 77, 130, 5], page_size, kh * group, kh, d, dv, dtype)
    _assert_close(gqa_partial_torch(q, kc, vc, pt, sl, 0.3), gqa_partial_ref(q, kc, vc, pt, sl, 0.3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_torch_mla_matches_reference(dtype, page_size):
    ql, qr, kv, pt, sl = _mla_problem([90, 0, 33], page_size, 5, 48, 8, dtype)
    _assert_close(mla_partial_torch(ql, qr, kv, pt, sl, 0.2), mla_partial_ref(ql, qr, kv, pt, sl, 0.2), dtype)


def test_torch_long_rows_use_request_loop_and_chunks(monkeypatch):
    """Longest row > _BATCH_MAX_TOKENS takes the per-request loop; tiny chunks force many
    online-softmax steps. Both must still match the reference and bound the chunk width."""
    widths = []
    real_update = torch_decode._OnlineSoftmax.update

    def spy(self, scores, values):
        widths.append(scores.shape[-1])
        real_update(self, scores, values)

    monkeypatch.setattr(torch_decode._OnlineSoftmax, "update", spy)
    monkeypatch.setattr(torch_decode, "_CHUNK_ELEMS", 1)
    monkeypatch.setattr(torch_decode, "_MIN_CHUNK_TOKENS", 64)
    long = torch_decode._BATCH_MAX_TOKENS + 100
    q, kc, vc, pt, sl = _gqa_problem([long, 0, 70], 16, 4, 2, 16, 16, torch.float32)
    _assert_close(gqa_partial_torch(q, kc, vc, pt, sl, 0.25), gqa_partial_ref(q, kc, vc, pt, sl, 0.25), torch.float32)
    assert max(widths) == 64 and len(widths) > long // 64
    ql, qr, kv, pt, sl = _mla_problem([long, 3], 16, 3, 48, 8, torch.float32)
    _assert_close(mla_partial_torch(ql, qr, kv, pt, sl, 0.2), mla_partial_ref(ql, qr, kv, pt, sl, 0.2), torch.float32)


def test_torch_all_rows_empty():
    q, kc, vc, pt, sl = _gqa_problem([0, 0], 16, 4, 2, 16, 16, torch.bfloat16)
    pt = torch.full((2, 3), -1, dtype=torch.int32)
    out, lse = gqa_partial_torch(q, kc, vc, pt, sl, 0.25)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("impl", ["torch", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_out_dtype_fp32_is_the_unrounded_partial(impl):
    """out_dtype=torch.float32 (what decode.HelixAttention sends to the exchange): the same fp32
    accumulation, not rounded to bf16; the default output is exactly that rounded once (torch,
    reference; Triton's own fp32 -> bf16 store may round differently, so there: close)."""
    ql, qr, kv, pt, sl = _mla_problem([90, 0, 33], 16, 5, 48, 8, torch.bfloat16)
    q, kc, vc, gpt, gsl = _gqa_problem([0, 77, 5], 16, 4, 2, 40, 24, torch.bfloat16)
    for fn, args in ((partial_attention_mla, (ql, qr, kv, pt, sl, 0.2)),
                     (partial_attention_gqa, (q, kc, vc, gpt, gsl, 0.3))):
        out32, lse32 = fn(*args, impl=impl, out_dtype=torch.float32)
        out16, lse16 = fn(*args, impl=impl)
        assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
        if impl == "triton":
            torch.testing.assert_close(out32, out16.float(), atol=2**-7, rtol=2**-7)
            continue
        assert torch.equal(out32.to(torch.bfloat16), out16) and torch.equal(lse32, lse16)
        assert not torch.equal(out32, out16.float())  # bf16 rounding really was skipped


# ------------------------------------------------------------------------- Triton


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_triton_gqa_matches_reference(dtype, page_size, group):
    kh, d, dv = 2, 40, 24
    q, kc, vc, pt, sl = _gqa_problem([0, 37, 21], page_size, kh * group, kh, d, dv, dtype)
    _assert_close(gqa_partial_triton(q, kc, vc, pt, sl, 0.3), gqa_partial_ref(q, kc, vc, pt, sl, 0.3), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_triton_mla_matches_reference(dtype, page_size):
    ql, qr, kv, pt, sl = _mla_problem([40, 0, 19], page_size, 5, 48, 8, dtype)
    _assert_close(mla_partial_triton(ql, qr, kv, pt, sl, 0.2), mla_partial_ref(ql, qr, kv, pt, sl, 0.2), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("splits", [2, 5])
def test_triton_split_kv_matches_reference(splits):
    """Split-KV: more splits than blocks leaves some splits empty; the merge must ignore them."""
    q, kc, vc, pt, sl = _gqa_problem([50, 0, 9], 16, 4, 2, 40, 40, torch.float16)
    _assert_close(
        gqa_partial_triton(q, kc, vc, pt, sl, 0.3, num_splits=splits),
        gqa_partial_ref(q, kc, vc, pt, sl, 0.3),
        torch.float16,
    )
    ql, qr, kv, pt, sl = _mla_problem([45, 2], 16, 3, 48, 8, torch.bfloat16)
    _assert_close(
        mla_partial_triton(ql, qr, kv, pt, sl, 0.2, num_splits=splits),
        mla_partial_ref(ql, qr, kv, pt, sl, 0.2),
        torch.bfloat16,
    )


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_merge_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 2, 5, 24, generator=gen).to(dtype)
    lses = torch.randn(3, 2, 5, generator=gen) * 4
    lses[0, 0, 0] = float("-inf")  # one empty shard
    lses[:, 1, 2] = float("-inf")  # a row with every shard empty
    outs[:, 1, 2] = 0
    out, lse = merge_triton(outs, lses)
    ref_out, ref_lse = merge_ref(outs, lses)
    _assert_close((out, lse), (ref_out, ref_lse), dtype)
    assert out[1, 2].abs().max() == 0 and torch.isneginf(lse[1, 2])


@pytest.mark.triton
def test_triton_merge_single_shard_is_identity():
    gen = torch.Generator().manual_seed(4)
    outs, lses = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, generator=gen)
    out, lse = merge_triton(outs, lses)
    torch.testing.assert_close(out, outs[0])
    torch.testing.assert_close(lse, lses[0])


# ------------------------------------------------------------------------- Triton, GPU parameters
#
# The exact launch parameters CUDA runs (TritonConfig.gpu: 64/32-token blocks, fp16/bf16 fed to
# tl.dot as they are, fp32 dots at input_precision="ieee", split-KV sized for an H100's 132 SMs),
# run here by the interpreter on CPU tensors. What the interpreter cannot show:
# - tl.dot input_precision: the interpreter always computes np.matmul in fp32, so "ieee" vs "tf32"
#   give the same numbers here; a wrong precision mode would only show on the GPU
#   (scripts/gpu_check.py compares fp32 inputs there too).
# - bf16 tl.dot: triton 3.8's interpreter keeps bf16 as uint16 and multiplies the raw bits, so
#   bf16 runs inside interpreter_bf16_dot(), which widens bf16 operands to fp32 (exact) first,
#   i.e. what the tensor cores compute; the kernel's code path is the GPU one (upcast=False).
# - num_warps / num_stages, tensor-core accumulation order, memory coalescing and speed.

GPU_PARAMS = TritonConfig.gpu(num_sms=132)


@pytest.fixture
def gpu_interpreter():
    with interpreter_bf16_dot():
        yield GPU_PARAMS


def test_triton_config_by_device_and_split_choice():
    assert config_for(torch.device("cpu")) == TritonConfig.cpu()
    assert TritonConfig.cpu().upcast and TritonConfig.cpu().splits(1, 10**6) == 1
    gpu = TritonConfig.gpu(num_sms=132)
    assert not gpu.upcast and (gpu.block_n_gqa, gpu.block_n_mla, gpu.block_h_mla) == (64, 32, 16)
    assert gpu.dot_precision(torch.float32) == "ieee" and gpu.dot_precision(torch.bfloat16) == "tf32"
    assert gpu.splits(programs=1, capacity=1 << 20) == 64  # capped by max_splits
    assert gpu.splits(programs=1, capacity=600) == 3  # >= 256 tokens per split
    assert gpu.splits(programs=8, capacity=1 << 20) == 33  # ~2 waves of 132 SMs
    assert gpu.splits(programs=264, capacity=1 << 20) == 1
    assert TritonConfig.gpu(num_sms=132, num_warps=8).launch_options() == {"num_warps": 8}
    for bad in (dict(block_n_gqa=48), dict(block_h_mla=8), dict(fp32_precision="bf16"), dict(num_sms=-1)):
        with pytest.raises(ValueError, match="TritonConfig"):
            TritonConfig.gpu(**bad)
    with pytest.raises(ValueError, match="num_splits"):
        q, kc, vc, pt, sl = _gqa_problem([3], 4, 2, 1, 16, 16, torch.float32)
        gqa_partial_triton(q, kc, vc, pt, sl, 0.3, num_splits=0)


@pytest.mark.triton
def test_interpreter_bf16_dot_is_needed_and_scoped():
    """Without the shim the GPU parameter set gives garbage on bf16 under the interpreter (the
    reason TritonConfig.cpu upcasts); with it, the reference; the patch is undone on exit."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    q, kc, vc, pt, sl = _gqa_problem([40], 16, 2, 1, 16, 16, torch.bfloat16, seed=11)
    ref = gqa_partial_ref(q, kc, vc, pt, sl, 0.3)
    raw = gqa_partial_triton(q, kc, vc, pt, sl, 0.3, config=GPU_PARAMS)
    assert not torch.allclose(raw[0].float(), ref[0], atol=1.0)
    with interpreter_bf16_dot():
        _assert_close(gqa_partial_triton(q, kc, vc, pt, sl, 0.3, config=GPU_PARAMS), ref, torch.bfloat16)
    assert interpreter.InterpreterBuilder.create_dot is original


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 4])
def test_triton_gpu_params_gqa_matches_reference(gpu_interpreter, dtype, page_size, group):
    """130 tokens = 3 blocks of 64 with a ragged tail; D=40 / Dv=24 masked to 64 / 32.
    Interpreter limits (section comment): tl.dot input_precision is not emulated; bf16 dots run
    through interpreter_bf16_dot."""
    kh, d, dv = 2, 40, 24
    q, kc, vc, pt, sl = _gqa_problem([0, 130, 37, 5], page_size, kh * group, kh, d, dv, dtype)
    got = gqa_partial_triton(q, kc, vc, pt, sl, 0.3, config=gpu_interpreter)
    _assert_close(got, gqa_partial_ref(q, kc, vc, pt, sl, 0.3), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_triton_gpu_params_mla_matches_reference(gpu_interpreter, dtype, page_size):
    """5 heads in a 16-head block, 70 tokens = 3 blocks of 32, R=48 / Dr=8 masked.
    Interpreter limits (section comment): tl.dot input_precision is not emulated; bf16 dots run
    through interpreter_bf16_dot."""
    ql, qr, kv, pt, sl = _mla_problem([70, 0, 33], page_size, 5, 48, 8, dtype)
    got = mla_partial_triton(ql, qr, kv, pt, sl, 0.2, config=gpu_interpreter)
    _assert_close(got, mla_partial_ref(ql, qr, kv, pt, sl, 0.2), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu_params_mla_deepseek_dims(gpu_interpreter, dtype):
    """DeepSeek-V3's R=512 + Dr=64 (no masking along R) with 16 local heads, page size 64.
    Register / shared-memory limits of these tiles only show when compiled for a GPU."""
    ql, qr, kv, pt, sl = _mla_problem([45, 0, 64], 64, 16, 512, 64, dtype, seed=12)
    got = mla_partial_triton(ql, qr, kv, pt, sl, 576 ** -0.5, config=gpu_interpreter)
    _assert_close(got, mla_partial_ref(ql, qr, kv, pt, sl, 576 ** -0.5), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gpu_params_automatic_split_kv(gpu_interpreter, dtype, monkeypatch):
    """num_splits=None: the GPU choice splits a 600-token capacity 3 ways (256-token splits), so
    the 600-token row uses 3 splits, the 37-token row 1 (the others empty) and the 0-token row
    none; the fp32 partials then go through the Triton merge into the input dtype.
    Interpreter limits (section comment): tl.dot input_precision is not emulated; bf16 dots run
    through interpreter_bf16_dot."""
    from sglang_helix.kernels import triton_decode

    seen = []
    real = triton_decode.merge_triton
    monkeypatch.setattr(triton_decode, "merge_triton", lambda o, l, **kw: seen.append(o.shape) or real(o, l, **kw))
    q, kc, vc, pt, sl = _gqa_problem([600, 0, 37], 16, 4, 2, 32, 32, dtype, seed=13)
    _assert_close(gqa_partial_triton(q, kc, vc, pt, sl, 0.3, config=gpu_interpreter),
                  gqa_partial_ref(q, kc, vc, pt, sl, 0.3), dtype)
    ql, qr, kv, pt, sl = _mla_problem([600, 3], 16, 5, 48, 8, dtype, seed=14)
    _assert_close(mla_partial_triton(ql, qr, kv, pt, sl, 0.2, config=gpu_interpreter),
                  mla_partial_ref(ql, qr, kv, pt, sl, 0.2), dtype)
    assert [s[0] for s in seen] == [3, 3]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gpu_params_split_kv_edges(gpu_interpreter, dtype):
    """Explicit splits beyond the blocks a row has (empty splits) and a batch of all-empty rows."""
    q, kc, vc, pt, sl = _gqa_problem([70, 0, 9], 16, 4, 2, 40, 40, dtype, seed=15)
    _assert_close(gqa_partial_triton(q, kc, vc, pt, sl, 0.3, num_splits=4, config=gpu_interpreter),
                  gqa_partial_ref(q, kc, vc, pt, sl, 0.3), dtype)
    ql, qr, kv, pt, sl = _mla_problem([0, 0], 16, 3, 48, 8, dtype, seed=16)
    pt = torch.zeros(2, 4, dtype=torch.int32)
    _assert_close(mla_partial_triton(ql, qr, kv, pt, sl, 0.2, num_splits=2, config=gpu_interpreter),
                  mla_partial_ref(ql, qr, kv, pt, sl, 0.2), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_merge_fp32_partials_into_dtype(dtype):
    """The split-KV path's merge: fp32 partials, output in the input dtype (the merge kernel has
    no device-dependent parameters, so this is the GPU launch too)."""
    gen = torch.Generator().manual_seed(17)
    outs, lses = torch.randn(4, 3, 5, 40, generator=gen), torch.randn(4, 3, 5, generator=gen) * 3
    lses[1:, 0] = float("-inf")
    lses[:, 2, 4] = float("-inf")
    outs[:, 2, 4] = 0
    out, lse = merge_triton(outs, lses, out_dtype=dtype)
    ref_out, ref_lse = merge_ref(outs, lses)
    _assert_close((out, lse), (ref_out.to(dtype), ref_lse), dtype)


# ------------------------------------------------------------------------- whole sequence


def _shard_and_merge(run_rank, page_table, seq_lens, page_size, kvp, merge_impl):
    """Run every KVP rank on its local page table / lengths, then merge the partials."""
    outs, lses = [], []
    for rank in range(kvp):
        local_pt = layout.local_page_table(page_table, rank, kvp)
        local_sl = layout.local_seq_len(seq_lens, rank, page_size, kvp)
        out, lse = run_rank(local_pt, local_sl)
        outs.append(out)
        lses.append(lse)
    return merge_partials(torch.stack(outs), torch.stack(lses), impl=merge_impl)


@pytest.mark.parametrize("impl", ["torch", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_gqa_sharded_merge_equals_full_attention(impl):
    """KVP=2 by layout.local_page_table: merged partials == dense attention on the whole sequence.
    The 3-token request (< one page) leaves rank 1 with no token (empty partial)."""
    page_size, kvp, hq, kh, d = 4, 2, 4, 2, 16
    lens = [37, 3, 24]
    q, kc, vc, pt, sl = _gqa_problem(lens, page_size, hq, kh, d, d, torch.float32, seed=5)

    def run_rank(local_pt, local_sl):
        return partial_attention_gqa(q, kc, vc, local_pt, local_sl, 0.25, impl=impl)

    merge_impl = "triton" if impl == "triton" else "torch"
    out, lse = _shard_and_merge(run_rank, pt, sl, page_size, kvp, merge_impl)
    for b, n in enumerate(lens):
        k = layout_tokens(kc, pt[b], n).repeat_interleave(hq // kh, dim=1)
        v = layout_tokens(vc, pt[b], n).repeat_interleave(hq // kh, dim=1)
        ref_out, ref_lse = full_attention_ref(q[b], k, v, 0.25)
        torch.testing.assert_close(out[b], ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b], ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_mla_sharded_merge_equals_full_attention(impl):
    page_size, kvp, heads, rank_r, rope = 4, 3, 3, 48, 8
    lens = [29, 6]
    ql, qr, kv, pt, sl = _mla_problem(lens, page_size, heads, rank_r, rope, torch.float32, seed=6)

    def run_rank(local_pt, local_sl):
        return partial_attention_mla(ql, qr, kv, local_pt, local_sl, 0.2, impl=impl)

    out, lse = _shard_and_merge(run_rank, pt, sl, page_size, kvp, "triton" if impl == "triton" else "torch")
    for b, n in enumerate(lens):
        tokens = layout_tokens(kv, pt[b], n)  # [L, R + Dr]
        # Absorbed MLA as dense attention: one shared head, key = [c_kv | k_pe], value = c_kv.
        q_full = torch.cat([ql[b], qr[b]], dim=-1)
        k = tokens.unsqueeze(1).expand(n, heads, rank_r + rope)
        v = tokens[:, :rank_r].unsqueeze(1).expand(n, heads, rank_r)
        ref_out, ref_lse = full_attention_ref(q_full, k, v, 0.2)
        torch.testing.assert_close(out[b], ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b], ref_lse, atol=2e-5, rtol=2e-5)


def layout_tokens(cache, pages, n):
    """Tokens [0, n) of one request in logical order: cache [num_pages, P, ...] -> [n, ...]."""
    page_size = cache.shape[1]
    used = -(-n // page_size)
    return cache[pages[:used].long()].flatten(0, 1)[:n]


# ------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("impl", ["auto", "reference", "torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_entry_points_agree_across_impls(impl):
    q, kc, vc, pt, sl = _gqa_problem([12, 0], 4, 4, 2, 16, 8, torch.bfloat16, seed=7)
    _assert_close(
        partial_attention_gqa(q, kc, vc, pt, sl, 0.3, impl=impl), gqa_partial_ref(q, kc, vc, pt, sl, 0.3), torch.bfloat16
    )
    ql, qr, kv, pt, sl = _mla_problem([0, 9], 4, 2, 48, 8, torch.float16, seed=8)
    _assert_close(
        partial_attention_mla(ql, qr, kv, pt, sl, 0.2, impl=impl), mla_partial_ref(ql, qr, kv, pt, sl, 0.2), torch.float16
    )


@pytest.mark.parametrize("impl", ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_batch_and_strided_page_table(impl):
    """HOP-B slices can be empty (B=0); page tables may be column views (stride(1) != 1)."""
    q, kc, vc, pt, sl = _gqa_problem([19, 0, 6], 4, 4, 2, 16, 16, torch.float32, seed=9)
    strided = pt.repeat_interleave(2, dim=1)[:, ::2]
    assert strided.stride(1) == 2 and torch.equal(strided, pt)
    _assert_close(
        partial_attention_gqa(q, kc, vc, strided, sl, 0.3, impl=impl), gqa_partial_ref(q, kc, vc, pt, sl, 0.3), torch.float32
    )
    out, lse = partial_attention_gqa(q[:0], kc, vc, pt[:0], sl[:0], 0.3, impl=impl)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)
