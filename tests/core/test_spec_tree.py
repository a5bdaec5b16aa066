"""Draft trees under KV sharding (core spec_tree), exhaustive and property tests:

- branch virtual page tables follow SGLang 0.5.23's draft layout (prepare_for_draft's draft
  slots, duplicate_prefix_tail_to_draft_branches' copies, the paged backends' reading);
- the per-colour local tables partition every virtual sequence exactly (each token on the rank of
  its page's colour, once, in order) and reduce to the position-based tables for chains;
- the cross-rank KV move protocol (sources read per owner, all-gathered, picked by owner) equals a
  move on one unsharded pool, for any moves, on every rank;
- tree masks from both of SGLang's layouts; the tree chunk attention and helix_extend with a tree
  mask vs fp32 dense attention over each node's ancestors.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tree_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_helix import sharding, spec_tree
from sglang_helix.comm import LocalExchange
from sglang_helix.extend import helix_extend
from sglang_helix.kernels.reference import attention_lse_ref
from sglang_helix.metadata import plan_extend


def colored_ids(pages: int, kvp: int, gen: torch.Generator, colors=None) -> torch.Tensor:
    """[pages] distinct page ids (>= KVP, as the colored allocator's) of the given colours
    (default random)."""
    colors = torch.randint(0, kvp, (pages,), generator=gen) if colors is None else colors
    k = torch.randperm(4 * pages + 4, generator=gen)[:pages] + 1
    return k * kvp + colors


# ---------------------------------------------------------------- SGLang's branch layout


@pytest.mark.parametrize("page_size", [1, 2, 4])
@pytest.mark.parametrize("topk", [1, 2, 3])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_branch_columns_follow_sglang_draft_layout(page_size, topk, num_steps):
    """Column of virtual token p of branch t (a request of committed length L, draft step s):
    the prefix's own column below prefix_base; branch 0 continues the request's row; for t >= 1
    the prefix tail [prefix_base, L) reads the copy SGLang puts at the start of branch t's region
    (duplicate_prefix_tail_to_draft_branches: prefix_base + t * nnp * P + offset) and draft s
    sits at prefix_base + t * nnp * P + L % P + s (prepare_for_draft's out_cache_loc and
    generate_draft_decode_kv_indices); page size 1: seq_len + t * num_steps + s. Branch regions
    never overlap."""
    for length in range(0, 3 * page_size + 3):
        base, tail = length // page_size * page_size, length % page_size
        nnp = (tail + num_steps + page_size - 1) // page_size
        for step in range(num_steps):
            pages = -(-(length + step + 1) // page_size)
            cols, lens = spec_tree.branch_page_columns(torch.tensor([length]), topk, num_steps, step,
                                                       page_size, pages)
            assert lens.tolist() == [length + step + 1] * topk
            regions = []
            for t in range(topk):
                col = [int(cols[t, p // page_size]) * page_size + p % page_size for p in range(length + step + 1)]
                start = base + t * nnp * page_size
                want = (list(range(base)) + [start + p - base for p in range(base, length)]
                        + [start + tail + s for s in range(step + 1)])
                if page_size == 1:
                    assert want[length:] == [length + t * num_steps + s for s in range(step + 1)]
                assert col == want
                regions.append(set(col[base:]))
            assert all(not (a & b) for i, a in enumerate(regions) for b in regions[i + 1:])


# ---------------------------------------------------------------- per-colour local tables


def tokens_of(slots, local_len, rank, kvp, page_size):
    """(page id, offset) of every token a rank's table + local length describe, in order."""
    out = []
    for i in range(-(-int(local_len) // page_size)):
        count = min(page_size, int(local_len) - i * page_size)
        out += [(int(slots[i]) * kvp + rank, o) for o in range(count)]
    return out


@given(rows=st.integers(1, 4), pages=st.integers(1, 9), page_size=st.sampled_from([1, 2, 3, 4]),
       kvp=st.integers(1, 4), seed=st.integers(0, 10**6), data=st.data())
@settings(max_examples=200, deadline=None)
def test_local_tables_by_color_partition_every_sequence(rows, pages, page_size, kvp, seed, data):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([colored_ids(pages, kvp, gen) for _ in range(rows)])
    lens = torch.tensor(data.draw(st.lists(st.integers(0, pages * page_size), min_size=rows, max_size=rows)))
    for rank in range(kvp):
        slots, local = spec_tree.local_tables_by_color(ids, lens, rank, kvp, page_size)
        assert slots.shape == ids.shape
        for r in range(rows):
            want = [(int(ids[r, p // page_size]), p % page_size) for p in range(int(lens[r]))
                    if int(ids[r, p // page_size]) % kvp == rank]
            assert tokens_of(slots[r], local[r], rank, kvp, page_size) == want
    totals = sum(spec_tree.local_tables_by_color(ids, lens, r, kvp, page_size)[1] for r in range(kvp))
    assert torch.equal(totals, lens)


@given(rows=st.integers(1, 3), pages=st.integers(1, 9), page_size=st.sampled_from([2, 4]),
       kvp=st.integers(1, 4), seed=st.integers(0, 10**6), data=st.data())
@settings(max_examples=100, deadline=None)
def test_position_colored_pages_give_the_position_tables(rows, pages, page_size, kvp, seed, data):
    """A chain (ids coloured by position): the same table and lengths as the decode path's."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([colored_ids(pages, kvp, gen, torch.arange(pages) % kvp) for _ in range(rows)])
    lens = torch.tensor(data.draw(st.lists(st.integers(0, pages * page_size), min_size=rows, max_size=rows)))
    for rank in range(kvp):
        slots, local = spec_tree.local_tables_by_color(ids, lens, rank, kvp, page_size)
        assert torch.equal(local, sharding.local_seq_len(lens, rank, page_size, kvp))
        table = sharding.local_page_table(ids, rank, kvp) // kvp
        for r in range(rows):
            used = -(-int(local[r]) // page_size)
            assert slots[r, :used].tolist() == table[r, :used].tolist()


# ---------------------------------------------------------------- cross-rank KV moves


@given(pages=st.integers(1, 8), page_size=st.sampled_from([1, 2, 4]), kvp=st.integers(1, 4),
       seed=st.integers(0, 10**6), data=st.data())
@settings(max_examples=200, deadline=None)
def test_move_protocol_equals_an_unsharded_move(pages, page_size, kvp, seed, data):
    """Each rank holds the rows of its colour; a move reads every source on its owner (others
    read garbage), all-gathers, picks row i from rank move_sources(src)[i] and writes the targets
    it owns: every rank ends with exactly the unsharded pool's move (sources read first)."""
    gen = torch.Generator().manual_seed(seed)
    locs = (colored_ids(pages, kvp, gen)[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    n_tok = locs.numel()
    pool = torch.randn(int(locs.max()) + 1, 3, generator=gen)
    tgt_idx = data.draw(st.lists(st.integers(0, n_tok - 1), min_size=1, max_size=n_tok, unique=True))
    src_idx = data.draw(st.lists(st.integers(0, n_tok - 1), min_size=len(tgt_idx), max_size=len(tgt_idx)))
    tgt, src = locs[tgt_idx], locs[src_idx]
    want = pool.clone()
    want[tgt] = pool[src]
    owner = sharding.token_owner(locs, page_size, kvp)
    shards = [{int(loc): pool[loc].clone() for loc in locs[owner == r]} for r in range(kvp)]
    garbage = torch.full((3,), float("nan"))
    gathered = torch.stack([torch.stack([s.get(int(x), garbage) for x in src]) for s in shards])
    rows = spec_tree.moved_rows(gathered, spec_tree.move_sources(src, page_size, kvp))
    for r, shard in enumerate(shards):
        for i, loc in enumerate(tgt.tolist()):
            if loc in shard:
                shard[loc] = rows[i]
        for loc, row in shard.items():
            assert torch.equal(row, want[loc])


# ---------------------------------------------------------------- tree verify


TREES = [[-1, 0, 0, 1, 2, 3], [-1, 0, 1, 2, 3, 4], [-1, 0, 0, 0, 1, 1]]


def test_tree_masks_from_both_layouts():
    masks = torch.stack([tree_mask(p) for p in TREES])
    lens = [5, 0, 9]
    assert torch.equal(spec_tree.tree_masks(masks.reshape(-1), lens, 6), masks)  # QLEN_ONLY
    full = torch.cat([torch.cat([torch.ones(6, length, dtype=torch.bool), m], 1).reshape(-1)
                      for length, m in zip(lens, masks)])  # FULL_MASK: prefix columns first
    assert torch.equal(spec_tree.tree_masks(full.to(torch.uint8), lens, 6), masks)
    with pytest.raises(ValueError, match="fits neither"):
        spec_tree.tree_masks(torch.ones(7, dtype=torch.bool), lens, 6)
    assert not spec_tree.is_chain(masks) and spec_tree.is_chain(masks[1:2])


@pytest.mark.parametrize("hq, hk, scale_kv", [(4, 2, (1.0, 1.0)), (3, 1, (0.5, 2.0)), (2, 2, (1.0, 1.0))])
def test_tree_chunk_attention_matches_attention_over_ancestors(hq, hk, scale_kv):
    g = torch.Generator().manual_seed(hq)
    masks = torch.stack([tree_mask(p) for p in TREES])
    bs, n = masks.shape[:2]
    q, k, v = (torch.randn(bs * n, h, 5, generator=g) for h in (hq, hk, hk))
    out, lse = spec_tree.tree_chunk_attention_lse(q, k, v, masks, 0.3, k_scale=scale_kv[0], v_scale=scale_kv[1])
    for b in range(bs):
        for i in range(n):
            keys = masks[b, i].nonzero()[:, 0] + b * n
            ref, ref_lse = attention_lse_ref(q[b * n + i:b * n + i + 1], k[keys] * scale_kv[0],
                                             v[keys] * scale_kv[1], 0.3)
            torch.testing.assert_close(out[b * n + i], ref[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[b * n + i], ref_lse[0], atol=1e-5, rtol=1e-5)


def test_helix_extend_verifies_a_tree_over_a_paged_prefix():
    """KVP 1 (the local exchange): the verify nodes attend the whole prefix and their ancestors."""
    from sglang_helix.dev.paged import build_local_paged_cache

    g = torch.Generator().manual_seed(7)
    masks = torch.stack([tree_mask(p) for p in TREES])
    bs, n, hq, hk, d, page = masks.shape[0], masks.shape[1], 4, 2, 8, 4
    prefix = [9, 4, 13]
    keys = [torch.randn(length, hk, d, generator=g) for length in prefix]
    vals = [torch.randn(length, hk, d, generator=g) for length in prefix]
    cache, table = build_local_paged_cache([torch.cat([k, v], -1) for k, v in zip(keys, vals)], page, 1, 0)
    k_pages, v_pages = cache[..., :d], cache[..., d:]
    plan = plan_extend((n,) * bs, prefix, 0, page, 1, local_tables=lambda lens: (table, None),
                       chunk_masks=masks)
    q, kn, vn = (torch.randn(bs * n, h, d, generator=g) for h in (hq, hk, hk))
    out = helix_extend(q, kn, vn, plan, k_pages, v_pages, 0.35, kvp_rank=0, heads_per_rank=hq,
                       exchange=LocalExchange(None, 1), kernels="torch")
    for b in range(bs):
        for i in range(n):
            rows = masks[b, i].nonzero()[:, 0] + b * n
            ref, _ = attention_lse_ref(q[b * n + i:b * n + i + 1], torch.cat([keys[b], kn[rows]]),
                                       torch.cat([vals[b], vn[rows]]), 0.35)
            torch.testing.assert_close(out[b * n + i], ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_masks"):
        plan_extend((n, n - 1, n), prefix, 0, page, 1, local_tables=lambda lens: (table, None),
                    chunk_masks=masks)
