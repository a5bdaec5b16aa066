"""Triton extend kernel (kernels/triton_extend.py, TRITON_INTERPRET=1 on CPU) vs the fp32 reference
attention_lse_ref, and through attention.chunk_attention_lse / prefix_attention_lse (impl="triton"
vs impl="torch").

- chunk part: ragged requests back to back (one with no new token), causal per request, GQA
  groups, MHA, an MLA-like latent head (v a view of k's first R columns, and a separate v);
- prefix part: paged caches at shuffled slots (build_local_paged_cache, unused slots NaN) for
  both ranks of KVP 2: prefixes ending mid-page, page-aligned, a request whose rank owns nothing
  (local length 0: out 0, lse -inf), a request with no prefix;
- DeepSeek's real 512 + 64 head dims at T=2, both parts;
- the exact GPU parameter set (ExtendConfig.gpu) under the interpreter, bf16 dots through
  triton_decode.interpreter_bf16_dot.
What the interpreter cannot show (as tests/core/test_kernels.py's "GPU parameters" section):
tl.dot input_precision (np.matmul is fp32 either way), num_warps / num_stages, register and
shared-memory limits of the wide MLA tiles, tensor-core accumulation order, speed.
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix.attention import chunk_attention_lse, prefix_attention_lse
from sglang_helix.dev.paged import build_local_paged_cache
from sglang_helix.kernels.reference import attention_lse_ref
from sglang_helix.kernels.triton_decode import interpreter_bf16_dot
from sglang_helix.kernels.triton_extend import (
    ExtendConfig,
    _head_parts,
    _tile_table,
    chunk_attention_triton,
    config_for,
    prefix_attention_triton,
    query_tiles,
)
from sglang_helix.metadata import plan_extend

pytestmark = pytest.mark.triton

# vs the fp32 reference fed the same rounded inputs: out carries p rounded to the input dtype
# before p @ v; scores and lse are exact products accumulated in fp32.
TOL = {
    torch.float32: dict(out=dict(atol=2e-5, rtol=2e-5), lse=dict(atol=2e-5, rtol=0)),
    torch.float16: dict(out=dict(atol=3e-3, rtol=3e-3), lse=dict(atol=1e-4, rtol=0)),
    torch.bfloat16: dict(out=dict(atol=2.5e-2, rtol=2.5e-2), lse=dict(atol=1e-4, rtol=0)),
}
DTYPES = list(TOL)
CHUNK_LENS = [7, 1, 0, 20]
# (Hq, Hk, D, Dv, v is a view of k): GQA group 2 with masked dims, MHA, MLA-like latent 32 + rope 16.
SHAPES = {"gqa": (4, 2, 40, 24, False), "mha": (3, 3, 16, 16, False), "mla": (5, 1, 48, 32, True),
          "mla_v_copy": (5, 1, 48, 32, False)}
PAGE, KVP = 4, 2
# Prefixes: none, 3 (< one page: rank 1 owns nothing), 9 and 21 (end mid-page), 16 (page-aligned).
PREFIXES, EXTENDS = [0, 3, 9, 16, 21], [2, 3, 1, 4, 9]


def _assert_close(got, want, dtype):
    (out, lse), (ref_out, ref_lse) = got, want
    assert out.dtype == lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "empty rows must be exactly the -inf rows"
    assert (lse[empty] < 0).all() and (out[empty] == 0).all()
    torch.testing.assert_close(out, ref_out, **TOL[dtype]["out"])
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], **TOL[dtype]["lse"])


def _chunk_problem(lens, hq, hk, d, dv, v_in_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hk, d, generator=g).to(dtype)
    v = k[..., :dv] if v_in_k else torch.randn(t, hk, dv, generator=g).to(dtype)
    return q, k, v


def _chunk_ref(q, k, v, lens, scale):
    outs, lses, start = [], [], 0
    for n in lens:
        o, l = attention_lse_ref(q[start:start + n], k[start:start + n], v[start:start + n], scale, 0)
        outs.append(o)
        lses.append(l)
        start += n
    return torch.cat(outs), torch.cat(lses)


def _prefix_problem(kvp_rank, hq, hk, d, dv, v_in_k, dtype, prefixes=PREFIXES, extends=EXTENDS, seed=1):
    """(q, k_pages, v_pages, plan, per-request local keys (k, v)) for one KVP rank."""
    g = torch.Generator().manual_seed(seed)
    width = d if v_in_k else d + dv
    kv = [torch.randn(p, hk, width, generator=g).to(dtype) for p in prefixes]
    placeholder = torch.zeros(1, hk, width, dtype=dtype)  # never read: the plan's length is 0
    cache, table = build_local_paged_cache([x if len(x) else placeholder for x in kv], PAGE, KVP,
                                           kvp_rank, fill=float("nan"))
    k_pages = cache[..., :d]
    v_pages = cache[..., :dv] if v_in_k else cache[..., d:]
    plan = plan_extend(extends, prefixes, kvp_rank, PAGE, KVP, local_tables=lambda _: (table, None))
    q = torch.randn(sum(extends), hq, d, generator=g).to(dtype)
    local = []
    for i, p in enumerate(prefixes):
        mine = torch.tensor([j for j in range(p) if (j // PAGE) % KVP == kvp_rank], dtype=torch.long)
        keys = kv[i][mine]
        local.append((keys[..., :d], keys[..., :dv] if v_in_k else keys[..., d:]))
    return q, k_pages, v_pages, plan, local


def _prefix_ref(q, plan, local, scale, dv):
    out = torch.zeros(q.shape[0], q.shape[1], dv)
    lse = torch.full(q.shape[:2], float("-inf"))
    for i, (k, v) in enumerate(local):
        sl = slice(plan.starts[i], plan.starts[i + 1])
        if len(k):
            out[sl], lse[sl] = attention_lse_ref(q[sl], k, v, scale)
    return out, lse


# ------------------------------------------------------------------------- host tables, config


def test_query_tiles_and_table_are_plan_time():
    assert query_tiles([3, 0, 5], [3, 0, 5], 2) == (
        (0, 0, 2, 0, 3), (0, 2, 1, 2, 3), (2, 3, 2, 0, 5), (2, 5, 2, 2, 5), (2, 7, 1, 4, 5))
    assert query_tiles([2, 1], [0, 9], 4) == ((0, 0, 2, 0, 0), (1, 2, 1, 0, 9))
    assert query_tiles([], [], 4) == ()
    cpu = torch.device("cpu")
    table = _tile_table((3, 0, 5), (3, 0, 5), 2, cpu)
    assert table.dtype == torch.int32 and table.shape == (5, 5)
    assert _tile_table((3, 0, 5), (3, 0, 5), 2, cpu) is table  # one build per plan, not per layer


def test_extend_config_and_head_parts():
    assert config_for(torch.device("cpu")) == ExtendConfig.cpu() and ExtendConfig.cpu().upcast
    gpu = ExtendConfig.gpu()
    assert not gpu.upcast and gpu.launch_options() == {"num_warps": 8}
    assert [gpu.blocks(wide, dt) for wide in (False, True) for dt in (torch.bfloat16, torch.float32)] == [
        (128, 64), (128, 32), (32, 32), (32, 16)]  # fp32 operands: half the keys per step
    assert ExtendConfig.cpu().blocks(True, torch.float32) == (16, 16)
    assert gpu.dot_precision(torch.float32) == "ieee" and gpu.dot_precision(torch.bfloat16) == "tf32"
    for bad in (dict(block_m=48), dict(block_n=8), dict(block_h=3), dict(block_h=64),
                dict(fp32_precision="bf16")):
        with pytest.raises(ValueError, match="ExtendConfig"):
            ExtendConfig.gpu(**bad)
    assert [_head_parts(d) for d in (8, 16, 40, 48, 64, 128, 192, 576)] == [
        (16, 0), (16, 0), (32, 16), (32, 16), (64, 0), (128, 0), (128, 64), (512, 64)]


# ------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_chunk_matches_reference(dtype, shape):
    """CPU tiles: 16 rows (8 tokens x 2 heads for GQA), 16 keys: the 20-token request spans
    several query tiles and crosses key tiles, diagonal and below."""
    hq, hk, d, dv, v_in_k = SHAPES[shape]
    q, k, v = _chunk_problem(CHUNK_LENS, hq, hk, d, dv, v_in_k, dtype)
    _assert_close(chunk_attention_triton(q, k, v, CHUNK_LENS, 0.3), _chunk_ref(q, k, v, CHUNK_LENS, 0.3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["gqa", "mla"])
@pytest.mark.parametrize("kvp_rank", [0, 1])
def test_prefix_matches_reference(dtype, shape, kvp_rank):
    hq, hk, d, dv, v_in_k = SHAPES[shape]
    q, kp, vp, plan, local = _prefix_problem(kvp_rank, hq, hk, d, dv, v_in_k, dtype)
    got = prefix_attention_triton(q, kp, vp, plan.page_table, plan.extend_lens, plan.local_prefix_lens, 0.3)
    _assert_close(got, _prefix_ref(q, plan, local, 0.3, dv), dtype)


def test_prefix_with_nothing_local_launches_nothing():
    q, kp, vp, plan, _ = _prefix_problem(1, 4, 2, 16, 16, False, torch.float32, prefixes=[0, 3], extends=[2, 3])
    assert plan.local_prefix_lens == (0, 0)
    out, lse = prefix_attention_triton(q, kp, vp, plan.page_table, plan.extend_lens, plan.local_prefix_lens, 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all() and out.shape == (5, 4, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_mla_dims_both_parts(dtype):
    """R = 512 latent + 64 rope, 4 heads, T = 2 (one request of 2 tokens; one of 0 new tokens)."""
    r, dr, scale = 512, 64, 576 ** -0.5
    q, k, v = _chunk_problem([2, 0], 4, 1, r + dr, r, True, dtype, seed=5)
    _assert_close(chunk_attention_triton(q, k, v, [2, 0], scale), _chunk_ref(q, k, v, [2, 0], scale), dtype)
    q, kp, vp, plan, local = _prefix_problem(0, 4, 1, r + dr, r, True, dtype, prefixes=[11, 5], extends=[2, 0])
    got = prefix_attention_triton(q, kp, vp, plan.page_table, plan.extend_lens, plan.local_prefix_lens, scale)
    _assert_close(got, _prefix_ref(q, plan, local, scale, r), dtype)


# ------------------------------------------------------------------------- GPU parameters


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_params_match_reference(dtype):
    """ExtendConfig.gpu: 128-row / 64-key tiles (GQA group 4: 32 tokens x 4 heads; 32 keys for
    fp32), 32 x 32 for the wide latent (3 heads x 10 tokens, masked). 70 tokens cross query and
    key tiles. bf16 dots through interpreter_bf16_dot."""
    cfg = ExtendConfig.gpu()
    with interpreter_bf16_dot():
        q, k, v = _chunk_problem([70, 5], 8, 2, 32, 32, False, dtype, seed=3)
        _assert_close(chunk_attention_triton(q, k, v, [70, 5], 0.2, config=cfg),
                      _chunk_ref(q, k, v, [70, 5], 0.2), dtype)
        q, kp, vp, plan, local = _prefix_problem(1, 8, 2, 32, 32, False, dtype, prefixes=[150, 0, 9],
                                                 extends=[3, 2, 17])
        got = prefix_attention_triton(q, kp, vp, plan.page_table, plan.extend_lens, plan.local_prefix_lens, 0.2,
                                      config=cfg)
        _assert_close(got, _prefix_ref(q, plan, local, 0.2, 32), dtype)
        q, kp, vp, plan, local = _prefix_problem(0, 3, 1, 576, 512, True, dtype, prefixes=[80], extends=[2],
                                                 seed=4)
        got = prefix_attention_triton(q, kp, vp, plan.page_table, plan.extend_lens, plan.local_prefix_lens, 0.05,
                                      config=cfg)
        _assert_close(got, _prefix_ref(q, plan, local, 0.05, 512), dtype)


# ------------------------------------------------------------------------- through attention.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_entry_points_triton_vs_torch(dtype, shape):
    hq, hk, d, dv, v_in_k = SHAPES[shape]
    q, k, v = _chunk_problem(CHUNK_LENS, hq, hk, d, dv, v_in_k, dtype, seed=6)
    want = chunk_attention_lse(q, k, v, CHUNK_LENS, 0.3, impl="torch")
    _assert_close(chunk_attention_lse(q, k, v, CHUNK_LENS, 0.3, impl="triton"), want, dtype)
    _assert_close(chunk_attention_lse(q, k, v, CHUNK_LENS, 0.3, impl="reference"), want, dtype)
    for rank in range(KVP):
        q, kp, vp, plan, _ = _prefix_problem(rank, hq, hk, d, dv, v_in_k, dtype, seed=7)
        want = prefix_attention_lse(q, kp, vp, plan, 0.3, impl="torch")
        _assert_close(prefix_attention_lse(q, kp, vp, plan, 0.3, impl="triton"), want, dtype)
        _assert_close(prefix_attention_lse(q, kp, vp, plan, 0.3, impl="reference"), want, dtype)


def test_entry_points_auto_and_refusals():
    q, k, v = _chunk_problem([3, 2], 4, 2, 16, 16, False, torch.float32)
    auto, torch_out = (chunk_attention_lse(q, k, v, [3, 2], 0.3, impl=i) for i in ("auto", "torch"))
    assert torch.equal(auto[0], torch_out[0]) and torch.equal(auto[1], torch_out[1])  # CPU: torch
    with pytest.raises(ValueError, match="impl='cuda' is unknown"):
        chunk_attention_lse(q, k, v, [3, 2], 0.3, impl="cuda")
    strided = torch.randn(5, 2, 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dim"):
        chunk_attention_lse(q, strided, v, [3, 2], 0.3, impl="triton")
    chunk_attention_lse(q, strided, v, [3, 2], 0.3, impl="torch")  # the torch path takes any view
    with pytest.raises(TypeError, match="cast k to torch.float32"):
        chunk_attention_lse(q, k.half(), v, [3, 2], 0.3, impl="triton")
