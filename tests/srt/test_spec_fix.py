"""The CPU-engine speculative-decoding ops (sglang_helix.srt.cpu.spec_fix) against references
written here from the trees' parent lists, not from masks or from the module's code.

- each torch op (tree reconstruction, greedy verify, cache-slot gathers/scatters, accepted-slot
  compaction) on hand-made trees and chains (full, partial and zero accept; NGRAM's padded drafts;
  batches; slots in shuffled pages of 4) and on hypothesis-drawn trees;
- target-verify attention on torch_native vs a float64 softmax over each draft's ancestors;
- pinned: SGLang 0.5.23 alone cannot import NGRAM's tree op on this CPU; the hooks apply to SGLang's
  live targets in a fresh interpreter, where SGLang's own dispatchers then run these ops;
- the hook table is in the CPU-engine tables only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang_helix.srt.cpu import spec_fix


# ------------------------------------------------------------------ references from parent lists


def mask_from_parents(parents):
    """[n, n] bool: row i marks i and every ancestor of i (parents[0] = -1: the root)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def links_ref(parents, seq_len, base):
    """(positions, retrieve_index, next_token, next_sibling) of one tree, from its parent list."""
    n = len(parents)
    children = [[c for c in range(n) if parents[c] == p] for p in range(n)]
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    nxt = [min(children[i]) if children[i] else -1 for i in range(n)]
    sib = []
    for i in range(n):
        later = [c for c in children[parents[i]] if c > i] if parents[i] >= 0 else []
        sib.append(min(later) if later else -1)
    return [d + seq_len for d in depth], [base + i for i in range(n)], nxt, sib


def verify_ref(parents, cand, target, steps):
    """Greedy walk of one tree: (accepted node indices incl. the root, bonus token)."""
    n = len(parents)
    path, node = [0], 0
    while len(path) < steps:
        kids = [c for c in range(n) if parents[c] == node]
        match = [c for c in kids if cand[c] == target[node]]
        if not match:
            break
        node = match[0]
        path.append(node)
    return path, target[node]


CHAIN = [-1, 0, 1, 2]
STAR = [-1, 0, 0, 0]
MIXED = [-1, 0, 0, 1, 1, 2]  # root -> {1, 2}, 1 -> {3, 4}, 2 -> {5}
NGRAM_PADDED = [-1, 0, 0, 0]  # what NGRAM's corpus returns on no match: pads as root children
TREES = {"chain": CHAIN, "star": STAR, "mixed": MIXED, "ngram-padded": NGRAM_PADDED}


def _run_reconstruct(trees, seq_lens, dtype=torch.bool):
    n = len(trees[0])
    bs = len(trees)
    mask = torch.cat([mask_from_parents(p).reshape(-1) for p in trees]).to(dtype)
    outs = [torch.full((bs * n,), -7, dtype=torch.int64)] + [torch.full((bs, n), -7, dtype=torch.int64)
                                                             for _ in range(3)]
    spec_fix.reconstruct_indices_from_tree_mask(mask, torch.tensor(seq_lens), *outs, bs, n)
    return outs


@pytest.mark.parametrize("name", sorted(TREES))
def test_reconstruct_hand_made_trees(name):
    parents = TREES[name]
    positions, index, nxt, sib = _run_reconstruct([parents], [9])
    assert [positions.tolist(), index[0].tolist(), nxt[0].tolist(), sib[0].tolist()] == [
        list(x) for x in links_ref(parents, 9, 0)]


def test_reconstruct_batch_and_uint8_mask():
    trees, lens = [MIXED, [-1, 0, 1, 2, 3, 4], [-1, 0, 0, 2, 2, 0]], [5, 0, 13]
    for dtype in (torch.bool, torch.uint8):
        positions, index, nxt, sib = _run_reconstruct(trees, lens, dtype)
        for b, (parents, length) in enumerate(zip(trees, lens)):
            ref = links_ref(parents, length, b * 6)
            assert positions.view(3, 6)[b].tolist() == ref[0] and index[b].tolist() == ref[1]
            assert nxt[b].tolist() == ref[2] and sib[b].tolist() == ref[3]


def test_reconstruct_empty_batch_writes_nothing():
    outs = [torch.full((4,), -7)] + [torch.full((1, 4), -7) for _ in range(3)]
    spec_fix.reconstruct_indices_from_tree_mask(torch.ones(16, dtype=torch.bool), torch.tensor([3]), *outs, 0, 4)
    assert all(bool((o == -7).all()) for o in outs)


def parents_of(n):
    """Parent lists of trees of n nodes in SGLang's order (every parent before its children)."""
    return st.tuples(*[st.just(-1)] + [st.integers(0, i - 1) for i in range(1, n)]).map(list)


parents_st = st.integers(1, 8).flatmap(parents_of)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), bs=st.integers(1, 3), data=st.data())
def test_reconstruct_random_trees(n, bs, data):
    trees = [data.draw(parents_of(n)) for _ in range(bs)]
    lens = data.draw(st.lists(st.integers(0, 50), min_size=bs, max_size=bs))
    positions, index, nxt, sib = _run_reconstruct(trees, lens)
    for b, (parents, length) in enumerate(zip(trees, lens)):
        ref = links_ref(parents, length, b * n)
        assert [positions.view(-1, n)[b].tolist(), index[b].tolist(), nxt[b].tolist(), sib[b].tolist()] == list(ref)


# ------------------------------------------------------------------ greedy verify


def _run_verify(trees, cands, targets, steps):
    """Links from the (already tested) reconstruction, then the op; per request (path, bonus)."""
    bs, n = len(trees), len(trees[0])
    _, index, nxt, sib = _run_reconstruct(trees, [0] * bs)
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, steps), -1, dtype=torch.int32)
    count = torch.full((bs,), -5, dtype=torch.int32)
    spec_fix.verify_tree_greedy_cpu(
        predicts=predicts, accept_index=accept_index, accept_token_num=count,
        candidates=torch.tensor(cands, dtype=torch.int64), retrive_index=index,
        retrive_next_token=nxt, retrive_next_sibling=sib,
        target_predict=torch.tensor(targets, dtype=torch.int64))
    return predicts, accept_index, count


def _check_verify(trees, cands, targets, steps):
    predicts, accept_index, count = _run_verify(trees, cands, targets, steps)
    n = len(trees[0])
    expected_predicts = torch.zeros(len(trees) * n, dtype=torch.int32)
    for b, parents in enumerate(trees):
        path, bonus = verify_ref(parents, cands[b], targets[b], steps)
        glob = [b * n + i for i in path]
        assert accept_index[b].tolist() == glob + [-1] * (steps - len(path))
        assert int(count[b]) == len(path) - 1
        for node, nxt_node in zip(path, path[1:]):
            expected_predicts[b * n + node] = cands[b][nxt_node]  # the accepted draft = target there
        expected_predicts[glob[-1]] = bonus
    assert predicts.tolist() == expected_predicts.tolist()
    return count.tolist()


def test_verify_chain_full_partial_zero_accept():
    cands = [[50, 11, 12, 13]] * 3
    targets = [[11, 12, 13, 14], [11, 12, 99, 98], [77, 12, 13, 14]]  # full, 2 drafts, none
    assert _check_verify([CHAIN] * 3, cands, targets, 4) == [3, 2, 0]
    assert _check_verify([CHAIN], [cands[0]], [targets[0]], 3) == [2]  # capped by accept_index width


def test_verify_trees_take_the_first_matching_sibling():
    # MIXED: root -> {1, 2}, 1 -> {3, 4}, 2 -> {5}; both 1 and 2 carry 7: the walk takes node 1
    cands = [[0, 7, 7, 8, 9, 8], [0, 6, 7, 8, 9, 8], [0, 6, 7, 8, 9, 8]]
    targets = [[7, 9, 8, 0, 0, 0], [7, 9, 8, 0, 0, 0], [5, 5, 5, 5, 5, 5]]
    assert _check_verify([MIXED] * 3, cands, targets, 6) == [2, 2, 0]  # 0->1->4; 0->2->5; none
    # NGRAM's padding: drafts [t, 0, 0] as root children; target 0 at the root accepts pad node 2
    assert _check_verify([NGRAM_PADDED], [[5, 3, 0, 0]], [[0, 1, 2, 3]], 4) == [1]


@settings(max_examples=60, deadline=None)
@given(parents=parents_st, data=st.data())
def test_verify_random_trees(parents, data):
    n = len(parents)
    tokens = st.lists(st.integers(0, 2), min_size=n, max_size=n)  # tiny vocabulary: many matches
    cands, targets = data.draw(tokens), data.draw(tokens)
    _check_verify([parents], [cands], [targets], data.draw(st.integers(1, n)))


# ------------------------------------------------------------------ cache-slot ops


def _paged_table(rows, cols, page=4, seed=0):
    """req_to_token of int32 slots in shuffled pages of `page` (slot = page id * page + offset)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randperm(rows * cols // page, generator=g) + 1
    return (pages.view(rows, cols // page, 1) * page + torch.arange(page)).reshape(rows, cols).to(torch.int32)


def test_assign_extend_cache_locs_and_its_inverse_on_pages():
    table = _paged_table(5, 32)
    req = torch.tensor([3, 0, 4, 1])
    start = torch.tensor([6, 0, 13, 9])  # ranges cross page boundaries; the last one is empty
    end = torch.tensor([10, 4, 19, 9])
    out = torch.full((20,), -1, dtype=torch.int64)
    spec_fix.assign_extend_cache_locs_cpu(req, table, start, end, out, 32)
    ref = [int(table[r, j]) for r, s, e in zip(req.tolist(), start.tolist(), end.tolist()) for j in range(s, e)]
    assert out[:14].tolist() == ref and bool((out[14:] == -1).all())
    new = torch.arange(1000, 1014, dtype=torch.int64)
    written = table.clone()
    spec_fix.assign_req_to_token_pool_cpu(req, written, start, end, new, 32)
    expected, k = table.clone(), 0
    for r, s, e in zip(req.tolist(), start.tolist(), end.tolist()):
        for j in range(s, e):
            expected[r, j] = 1000 + k
            k += 1
    assert torch.equal(written, expected)
    spec_fix.assign_extend_cache_locs_cpu(req, table, start, start, out, 32)  # nothing to copy
    assert out[:14].tolist() == ref


def test_fill_accept_out_cache_loc_compacts_in_order():
    out_cache_loc = torch.tensor([40, 41, 42, 43, 80, 81, 82, 83], dtype=torch.int64)
    accept_index = torch.tensor([[0, 1, 3, -1], [4, -1, -1, -1]], dtype=torch.int32)
    dest = torch.full((8,), -9, dtype=torch.int64)
    spec_fix.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, dest)
    assert dest.tolist() == [40, 41, 43, 80] + [-9] * 4
    dest.fill_(-9)
    spec_fix.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, dest, 3)  # first 3 entries
    assert dest.tolist() == [40, 41, 43] + [-9] * 5


# ------------------------------------------------------------------ target verify attention


class _Pool:
    def __init__(self, slots, heads, dim):
        g = torch.Generator().manual_seed(1)
        self.k = torch.randn(slots, heads, dim, generator=g)
        self.v = torch.randn(slots, heads, dim, generator=g)

    def set_kv_buffer(self, layer, write_loc, k, v):
        self.k[write_loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[write_loc.loc] = v.view(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def _verify_case(trees, lens, full_mask, window=-1, hq=4, hk=2, dim=8):
    n, bs = len(trees[0]), len(trees)
    g = torch.Generator().manual_seed(2)
    table = _paged_table(bs + 1, 32)
    rows = torch.arange(bs) + 1
    pool = _Pool(int(table.max()) + 1, hk, dim)
    tree = [mask_from_parents(p) for p in trees]
    if full_mask:  # FULL_MASK layout: each request's [n, L + n] rows
        custom = torch.cat([torch.cat([torch.ones(n, L, dtype=torch.bool), t], 1).reshape(-1)
                            for t, L in zip(tree, lens)])
    else:
        custom = torch.cat([t.reshape(-1) for t in tree])
    positions = torch.cat([L + mask_from_parents(p).sum(1) - 1 for p, L in zip(trees, lens)])
    out_loc = torch.cat([table[r, L:L + n] for r, L in zip(rows.tolist(), lens)]).to(torch.int64)
    q, k, v = (torch.randn(bs * n, h * dim, generator=g) for h in (hq, hk, hk))
    layer = SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hk, qk_head_dim=dim, v_head_dim=dim,
                            layer_id=0, scaling=dim ** -0.5, sliding_window_size=window,
                            is_cross_attention=False, attn_type=None)
    spec = SimpleNamespace(draft_token_num=n, custom_mask=custom, positions=positions)
    batch = SimpleNamespace(spec_info=spec, seq_lens=torch.tensor(lens), req_pool_indices=rows,
                            out_cache_loc=out_loc, forward_mode=SimpleNamespace(is_target_verify=lambda: True))
    backend = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=table),
                              swa_out_cache_loc=None)
    out = spec_fix._around_forward_extend(None, backend, q, k, v, layer, batch)
    # reference: draft i of request b attends to the L cached tokens and its own ancestors (float64)
    ref = torch.empty(bs * n, hq, dim, dtype=torch.float64)
    for b, (parents, L) in enumerate(zip(trees, lens)):
        slots = table[rows[b]].tolist()
        for i in range(n):
            keys = list(range(L)) + [L + j for j in range(n) if tree[b][i, j]]
            pos_i = L + int(tree[b][i].sum()) - 1
            if window > -1:  # key positions: cached j at j, draft j at L + depth(j)
                keys = [j for j in keys if (j if j < L else L + int(tree[b][j - L].sum()) - 1) >= pos_i - window]
            kk = pool.k[[slots[j] for j in keys]].double().repeat_interleave(hq // hk, 1)
            vv = pool.v[[slots[j] for j in keys]].double().repeat_interleave(hq // hk, 1)
            qq = q[b * n + i].view(hq, dim).double()
            w = torch.softmax(torch.einsum("hd,khd->hk", qq, kk) * dim ** -0.5, -1)
            ref[b * n + i] = torch.einsum("hk,khd->hd", w, vv)
    assert torch.equal(pool.k[out_loc], k.view(-1, hk, dim))  # the drafts' KV is stored first
    torch.testing.assert_close(out.view(-1, hq, dim).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("full_mask", [False, True], ids=["qlen-mask", "full-mask"])
def test_verify_attention_matches_ancestor_attention(full_mask):
    _verify_case([MIXED, [-1, 0, 1, 2, 3, 4]], [7, 13], full_mask)  # page-crossing drafts
    _verify_case([NGRAM_PADDED], [5], full_mask)


def test_verify_attention_sliding_window():
    _verify_case([MIXED, [-1, 0, 1, 2, 3, 4]], [7, 13], False, window=4)


def test_other_forward_modes_go_to_sglang_unchanged():
    batch = SimpleNamespace(forward_mode=SimpleNamespace(is_target_verify=lambda: False))
    seen = []
    result = spec_fix._around_forward_extend(lambda *a, **kw: seen.append((a, kw)) or "orig",
                                             "be", "q", "k", "v", "layer", batch, save_kv_cache=False)
    assert result == "orig" and seen == [(("be", "q", "k", "v", "layer", batch), {"save_kv_cache": False})]


def test_verify_mask_of_unknown_layout_is_refused():
    with pytest.raises(spec_fix.CpuSpecError, match="fits neither"):
        spec_fix.verify_masks(torch.ones(7, dtype=torch.bool), [3], 2)


# ------------------------------------------------------------------ SGLang: pinned fact, hooks


def test_sglang_alone_cannot_import_the_tree_op_on_this_cpu():
    """Pinned (SGLang 0.5.23, no CPU sgl-kernel): NGRAM's worker imports reconstruct_tree, which
    imports sgl_kernel.speculative on CPU; nothing provides it without the plugin."""
    code = ("import importlib.util, os; os.environ['SGLANG_USE_CPU_ENGINE'] = '1'\n"
            "assert importlib.util.find_spec('sgl_kernel') is None\n"
            "import sglang.kernels.ops.speculative.reconstruct_tree\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "SGLANG_PLUGINS": "none"})
    if "AssertionError" in res.stderr:
        pytest.skip("a real sgl_kernel is installed here")
    assert res.returncode != 0 and "No module named 'sgl_kernel'" in res.stderr, res.stderr[-2000:]


SGLANG_CALLS = """
import torch
from sglang.kernels.ops.speculative.reconstruct_tree import reconstruct_indices_from_tree_mask_func
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_func
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func, fill_front_out_cache_loc_func
from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc_func
from sglang.srt.mem_cache.allocation import assign_req_to_token_pool_func
import sglang.srt.speculative.ngram_worker  # the NGRAM worker module imports now
n = 4
mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).reshape(-1)  # a chain
pos, idx, nxt, sib = torch.empty(n, dtype=torch.int64), *(torch.empty(1, n, dtype=torch.int64) for _ in range(3))
reconstruct_indices_from_tree_mask_func(mask, torch.tensor([6]), pos, idx, nxt, sib, 1, n)
assert pos.tolist() == [6, 7, 8, 9] and nxt.tolist() == [[1, 2, 3, -1]] and sib.tolist() == [[-1] * 4]
pred, acc, cnt = verify_tree_greedy_func(torch.zeros(n, dtype=torch.int32), torch.full((1, n), -1, dtype=torch.int32),
    torch.empty(1, dtype=torch.int32), torch.tensor([[5, 11, 12, 13]]), idx, nxt, sib, torch.tensor([[11, 12, 99, 0]]))
assert acc.tolist() == [[0, 1, 2, -1]] and cnt.tolist() == [2] and pred.tolist() == [11, 12, 99, 0]
table = torch.arange(64, dtype=torch.int32).view(2, 32)
locs = assign_extend_cache_locs_func(torch.tensor([1]), table, torch.tensor([6]), torch.tensor([10]), 1, n, "cpu")
assert locs.tolist() == [38, 39, 40, 41]
front = torch.zeros(4, dtype=torch.int64)
fill_front_out_cache_loc_func(torch.tensor([3], dtype=torch.int32), locs, front)
assert front.tolist() == [38, 39, 40, 0]
dest = torch.zeros(4, dtype=torch.int64)
fill_accept_out_cache_loc_func(acc, locs, dest, 4)
assert dest.tolist() == [38, 39, 40, 0]
assign_req_to_token_pool_func(torch.tensor([0]), table, torch.tensor([2]), torch.tensor([4]), torch.tensor([70, 71]), 1)
assert table[0, :5].tolist() == [0, 1, 70, 71, 4]
"""


SGLANG_CHECKS = {"ngram-spec: SGLang's dispatchers run the torch ops": SGLANG_CALLS}


def test_hooks_apply_and_sglang_dispatchers_run_the_torch_ops(sglang_checks):
    sglang_checks.assert_ok("ngram-spec: SGLang's dispatchers run the torch ops")


def test_kv_copy_setup_is_replaced_by_sglangs_native_move():
    pool = SimpleNamespace(_kv_copy_config="tiled", use_native_move_kv_cache=False)
    spec_fix.native_kv_move(pool)
    assert pool._kv_copy_config is None and pool.use_native_move_kv_cache is True


def test_spec_hooks_only_in_the_cpu_engine_tables():
    from sglang_helix.srt.hook_table import installed_rows, rows_of_fix

    rows = rows_of_fix("ngram-spec")
    assert len(rows) == 8 and all(r.cpu_only and r.owner == "cpu.spec_fix" for r in rows)
    assert not set(rows) & set(installed_rows(False))
    assert set(rows) <= set(installed_rows(True, {"SGLANG_USE_CPU_ENGINE": "1"}))
