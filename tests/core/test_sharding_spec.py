"""Property tests of the speculative-verify index math (sharding.token_owner of draft positions
and of colored locs, kv_move_is_local): draft slots keep their positions' owners, chain accepts never move KV
between ranks, the staggered append stays balanced over verify steps of any accept length."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_helix import sharding as layout

KVP = st.integers(1, 4)
PAGE = st.sampled_from([2, 3, 4, 16])


def colored_locs(seq_len: int, page_size: int, kvp: int, seed: int) -> torch.Tensor:
    """[seq_len] logical locs as the colored allocator hands them out: logical page j gets a
    random distinct page id of color j % KVP (ids from KVP up, as HelixPagedAllocator)."""
    gen = torch.Generator().manual_seed(seed)
    pages = -(-seq_len // page_size)
    per_color = pages + 1
    ids = []
    for j in range(pages):
        k = int(torch.randperm(per_color, generator=gen)[0]) + 1 + j * per_color
        ids.append(k * kvp + j % kvp)
    pos = torch.arange(seq_len)
    return torch.tensor(ids, dtype=torch.int64)[pos // page_size] * page_size + pos % page_size


@given(seq=st.integers(0, 500), n=st.integers(1, 12), page_size=PAGE, kvp=KVP,
       seed=st.integers(0, 10**6))
@settings(max_examples=150, deadline=None)
def test_draft_slots_keep_their_positions_owner(seq, n, page_size, kvp, seed):
    locs = colored_locs(seq + n, page_size, kvp, seed)
    owners = layout.token_owner(seq + torch.arange(n), page_size, kvp)
    assert owners.tolist() == [layout.token_owner(seq + i, page_size, kvp) for i in range(n)]
    assert torch.equal(layout.token_owner(locs[seq:], page_size, kvp), owners)


@given(seq=st.integers(0, 500), n=st.integers(1, 12), page_size=PAGE, kvp=KVP,
       seed=st.integers(0, 10**6), data=st.data())
@settings(max_examples=150, deadline=None)
def test_chain_accept_moves_stay_local_tree_moves_may_not(seq, n, page_size, kvp, seed, data):
    locs = colored_locs(seq + n, page_size, kvp, seed)[seq:]
    accepted = data.draw(st.integers(1, n))
    # chain: draft d sits at depth d, the move of an accepted draft is onto itself
    tgt = src = locs[:accepted]
    assert layout.kv_move_is_local(tgt, src, page_size, kvp).all()
    # tree: node k accepted at depth d <= k moves from slot k to slot d
    k = data.draw(st.integers(0, n - 1))
    d = data.draw(st.integers(0, k))
    local = bool(layout.kv_move_is_local(locs[d:d + 1], locs[k:k + 1], page_size, kvp))
    assert local == (layout.token_owner(seq + d, page_size, kvp)
                     == layout.token_owner(seq + k, page_size, kvp))


@given(start=st.integers(1, 300), n=st.integers(1, 8), page_size=PAGE, kvp=KVP,
       accepts=st.lists(st.integers(1, 8), min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_verify_steps_keep_the_staggered_append_balanced(start, n, page_size, kvp, accepts):
    seq = start
    for a in accepts:
        a = min(a, n)  # accepted drafts incl. the root, at most the window
        owners = layout.token_owner(seq + torch.arange(n), page_size, kvp)[:a]
        before = [layout.local_seq_len(seq, r, page_size, kvp) for r in range(kvp)]
        seq += a
        after = [layout.local_seq_len(seq, r, page_size, kvp) for r in range(kvp)]
        grew = torch.bincount(owners, minlength=kvp).tolist()
        assert [x - y for x, y in zip(after, before)] == grew
        assert max(after) - min(after) <= page_size
