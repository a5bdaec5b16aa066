"""The one extend algorithm (core extend / attention / kernels.torch_extend) against fp32 references.

- tiled attention with LSE vs reference.attention_lse_ref: causal and full, GQA groups, MLA's one
  latent head, several query/key tiles, per-dtype tolerances;
- the prefix partial over paged caches: ragged prefixes, prefixes ending mid-page, a rank that
  owns nothing of a request;
- plan_extend: host lengths per rank add up (property test);
- (helix_extend on 2 gloo ranks vs dense attention: tests/multirank/test_helix_extend.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_helix.attention import chunk_attention_lse, merge_state, prefix_attention_lse
from sglang_helix.dev.paged import build_local_paged_cache
from sglang_helix.kernels import torch_extend
from sglang_helix.kernels.reference import attention_lse_ref
from sglang_helix.metadata import plan_extend

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few tokens, so every test crosses query and key tile boundaries."""
    monkeypatch.setattr(torch_extend, "_Q_TILE", 5)
    monkeypatch.setattr(torch_extend, "_MIN_K_TILE", 3)
    monkeypatch.setattr(torch_extend, "_TILE_ELEMS", 8)


@pytest.fixture(params=["flash", "matmul"])
def tile_path(request, monkeypatch):
    """Both tile primitives: ATen's fused CPU flash attention (what CPU runs) and the explicit
    matmul + online softmax (other devices, or a torch without the op); the flash calls are
    counted so a test knows it really ran."""
    calls = []
    if request.param == "matmul":
        monkeypatch.setattr(torch_extend, "_SDPA_CPU", None)
    else:
        real = torch_extend._SDPA_CPU
        assert real is not None, "this torch has no _scaled_dot_product_flash_attention_for_cpu"
        monkeypatch.setattr(torch_extend, "_SDPA_CPU", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    return request.param, calls


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hq, hk, dv", [(4, 2, 5), (6, 1, 5), (3, 3, 5), (4, 2, 11)])
@pytest.mark.parametrize("offset", [0, 7, None], ids=["causal", "causal-offset", "full"])
def test_tiled_attention_matches_reference(small_tiles, tile_path, dtype, hq, hk, dv, offset):
    """Dv < D and Dv > D (the flash path pads to one head size), causal with and without an
    offset (query i sees keys 0..i + offset), small tiles so every tile boundary is crossed."""
    g = torch.Generator().manual_seed(hq * 10 + hk + dv)
    n = 23
    length = 31 if offset is None else n + offset
    q = torch.randn(n, hq, 8, generator=g).to(dtype)
    k = torch.randn(length, hk, 8, generator=g).to(dtype)
    v = torch.randn(length, hk, dv, generator=g).to(dtype)
    out, lse = torch_extend.tiled_attention_lse(q, torch_extend.dense_fetch(k, v), length, dv, 0.4,
                                                causal_offset=offset)
    ref_out, ref_lse = attention_lse_ref(q, k, v, 0.4, offset)
    path, calls = tile_path
    if path == "flash":  # several key tiles, and the causal square where there is one
        assert len(calls) > 2 and any(calls) == (offset is not None)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])


def test_tiled_attention_mla_values_share_the_key_rows(small_tiles, tile_path):
    """MLA: v = k[..., :R] is a view of the same paged rows (read once); ragged last page."""
    g = torch.Generator().manual_seed(5)
    page, length, rank_r = 4, 18, 6
    cache = torch.randn(7, page, 1, rank_r + 2, generator=g)
    pages = torch.tensor([5, 0, 3, 6, 2])
    q = torch.randn(9, 4, rank_r + 2, generator=g)
    fetch = torch_extend.paged_fetch(cache, cache[..., :rank_r], pages, page)
    out, lse = torch_extend.tiled_attention_lse(q, fetch, length, rank_r, 0.3, k_multiple=page)
    rows = cache[pages].flatten(0, 1)[:length]
    want_out, want_lse = attention_lse_ref(q, rows, rows[..., :rank_r], 0.3)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


def test_tiled_attention_empty_inputs_and_bad_offset(tile_path):
    q = torch.randn(3, 2, 4)
    out, lse = torch_extend.tiled_attention_lse(q, lambda a, b: (None, None), 0, 4, 0.5)
    assert torch.equal(out, torch.zeros(3, 2, 4)) and torch.isneginf(lse).all()
    out, lse = torch_extend.tiled_attention_lse(q[:0], lambda a, b: (None, None), 5, 4, 0.5)
    assert out.shape == (0, 2, 4) and lse.shape == (0, 2)
    with pytest.raises(ValueError, match="causal_offset must be >= 0"):
        torch_extend.tiled_attention_lse(q, lambda a, b: (None, None), 5, 4, 0.5, causal_offset=-1)


def test_chunk_attention_is_causal_per_request(small_tiles):
    g = torch.Generator().manual_seed(1)
    lens = [7, 1, 12]
    q, k, v = (torch.randn(20, 4, 6, generator=g), torch.randn(20, 2, 6, generator=g),
               torch.randn(20, 2, 3, generator=g))
    out, lse = chunk_attention_lse(q, k, v, lens, 0.5)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        want_out, want_lse = attention_lse_ref(q[sl], k[sl], v[sl], 0.5, 0)
        torch.testing.assert_close(out[sl], want_out, **TOL[torch.float32])
        torch.testing.assert_close(lse[sl], want_lse, **TOL[torch.float32])
        start += n
    with pytest.raises(ValueError, match="extend_lens sum"):
        chunk_attention_lse(q, k, v, [3], 0.5)


@pytest.mark.parametrize("kvp_rank", [0, 1])
def test_prefix_partial_over_pages(small_tiles, kvp_rank):
    """Prefixes 0, 3 (< one page: rank 1 owns nothing), 9 (ends mid-page), 16 (page-aligned)."""
    page, kvp, hk, d, dv = 4, 2, 2, 6, 5
    prefixes, chunks = [0, 3, 9, 16], [2, 3, 1, 4]
    g = torch.Generator().manual_seed(7)
    kv = [torch.randn(p, hk, d + dv, generator=g) for p in prefixes]
    cache, table = build_local_paged_cache([x if len(x) else torch.zeros(1, hk, d + dv) for x in kv],
                                           page, kvp, kvp_rank)
    k_pages, v_pages = cache[..., :d], cache[..., d:]
    plan = plan_extend(chunks, prefixes, kvp_rank, page, kvp, local_tables=lambda _: (table, None))
    q = torch.randn(sum(chunks), 4, d, generator=g)
    out, lse = prefix_attention_lse(q, k_pages, v_pages, plan, 0.3)
    for i, start in enumerate(plan.starts[:-1]):
        sl = slice(start, start + chunks[i])
        mine = torch.tensor([j for j in range(prefixes[i]) if (j // page) % kvp == kvp_rank], dtype=torch.long)
        if mine.numel() == 0:  # the rank holds nothing of this prefix: empty partial
            assert torch.equal(out[sl], torch.zeros_like(out[sl]))
            assert torch.isinf(lse[sl]).all() and (lse[sl] < 0).all()
            continue
        keys = kv[i][mine]
        want_out, want_lse = attention_lse_ref(q[sl], keys[..., :d], keys[..., d:], 0.3)
        torch.testing.assert_close(out[sl], want_out, **TOL[torch.float32])
        torch.testing.assert_close(lse[sl], want_lse, **TOL[torch.float32])


def test_merge_state_of_a_split_equals_the_whole():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(5, 2, 4, generator=g), torch.randn(9, 2, 4, generator=g), torch.randn(9, 2, 3, generator=g)
    a = attention_lse_ref(q, k[:4], v[:4], 0.7)
    b = attention_lse_ref(q, k[4:], v[4:], 0.7)
    out, lse = merge_state(*a, *b)
    want_out, want_lse = attention_lse_ref(q, k, v, 0.7)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), min_size=1, max_size=6),
       st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4, 16]))
def test_plan_extend_lengths_add_up(reqs, kvp, page):
    prefix = [p for p, _ in reqs]
    extend = [e for _, e in reqs]
    plans = [plan_extend(extend, prefix, r, page, kvp, local_tables=lambda lens: (lens[:, None], None))
             for r in range(kvp)]
    assert [sum(p.local_prefix_lens[i] for p in plans) for i in range(len(reqs))] == prefix
    for p in plans:
        assert p.starts[-1] == sum(extend) and p.has_prefix == any(prefix)
        assert (p.page_table is not None) == any(prefix)


def test_plan_extend_refuses_bad_lengths():
    with pytest.raises(ValueError, match=">= 0"):
        plan_extend([2, -1], [0, 0], 0, 4, 2)
    with pytest.raises(ValueError, match="local_tables"):
        plan_extend([2], [5], 0, 4, 2)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements any op inside the block produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_extend_memory_is_bounded_by_tiles_not_n_squared():
    """A 3000-token chunk over a 3000-token paged prefix: no intermediate as large as n x n
    (which the algorithm never builds); the largest is a tile of scores or the outputs."""
    n, heads, d, page = 3000, 2, 8, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(n, heads, d, generator=g), torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)
    cache, table = build_local_paged_cache([torch.randn(n, 1, 2 * d, generator=g)], page, 1, 0)
    plan = plan_extend([n], [n], 0, page, 1, local_tables=lambda _: (table, None))
    with _LargestTensor() as seen:
        chunk_attention_lse(q, k, v, [n], 0.3)
        prefix_attention_lse(q, cache[..., :d], cache[..., d:], plan, 0.3)
    bound = max(torch_extend._TILE_ELEMS + torch_extend._Q_TILE * heads * torch_extend._MIN_K_TILE,
                n * heads * d * 2)
    assert seen.largest <= bound < n * n, (seen.largest, bound)
