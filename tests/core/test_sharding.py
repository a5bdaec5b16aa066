"""Property and exhaustive tests of the pure Helix index math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_helix import sharding as layout

KVP = st.integers(1, 8)
PAGE = st.sampled_from([1, 2, 3, 16, 64])
LEN = st.integers(0, 3000)


def owned_positions(seq_len, rank, page_size, kvp):
    return [p for p in range(seq_len) if layout.token_owner(p, page_size, kvp) == rank]


@pytest.mark.parametrize("kvp", [1, 2, 3, 4])
@pytest.mark.parametrize("page_size", [1, 2, 5])
def test_exhaustive_small_sequences(kvp, page_size):
    for seq_len in range(0, 4 * kvp * page_size + 3):
        covered = []
        for rank in range(kvp):
            mine = owned_positions(seq_len, rank, page_size, kvp)
            assert layout.local_seq_len(seq_len, rank, page_size, kvp) == len(mine)
            # shard tokens are stored page-contiguously, in order, without holes
            assert [layout.local_token_index(p, page_size, kvp) for p in mine] == list(range(len(mine)))
            covered += mine
        assert sorted(covered) == list(range(seq_len))


@given(seq_len=LEN, page_size=PAGE, kvp=KVP)
def test_shards_partition_and_balance(seq_len, page_size, kvp):
    lens = [layout.local_seq_len(seq_len, r, page_size, kvp) for r in range(kvp)]
    assert sum(lens) == seq_len
    assert max(lens) - min(lens) <= page_size
    # earlier ranks never hold less: shards are filled in rotation order
    assert lens == sorted(lens, reverse=True) or seq_len == 0


@given(seq_len=LEN, page_size=PAGE, kvp=KVP)
def test_pages_differ_by_at_most_one(seq_len, page_size, kvp):
    pages = [layout.local_num_pages(seq_len, r, page_size, kvp) for r in range(kvp)]
    assert max(pages) - min(pages) <= 1
    assert sum(pages) == layout.num_pages(seq_len, page_size)


@given(seq_len=LEN, page_size=PAGE, kvp=KVP)
def test_append_owner_grows_exactly_one_shard(seq_len, page_size, kvp):
    owner = layout.append_owner(seq_len, page_size, kvp)
    before = [layout.local_seq_len(seq_len, r, page_size, kvp) for r in range(kvp)]
    after = [layout.local_seq_len(seq_len + 1, r, page_size, kvp) for r in range(kvp)]
    assert [a - b for a, b in zip(after, before)] == [int(r == owner) for r in range(kvp)]


@given(seq_len=st.integers(0, 2000), page_size=PAGE, kvp=KVP)
def test_owner_rotates_every_page(seq_len, page_size, kvp):
    owners = {layout.append_owner(seq_len + i, page_size, kvp) for i in range(page_size * kvp)}
    assert owners == set(range(kvp))


@given(
    prefix=st.integers(0, 40),
    tail_a=st.integers(0, 20),
    tail_b=st.integers(0, 20),
    kvp=KVP,
    seed=st.integers(0, 2**16),
)
@settings(max_examples=200)
def test_shared_prefix_pages_have_identical_owner_and_local_slot(prefix, tail_a, tail_b, kvp, seed):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randperm(1000, generator=gen)[:prefix]
    own_a = torch.randint(1000, 2000, (tail_a,), generator=gen)
    own_b = torch.randint(2000, 3000, (tail_b,), generator=gen)
    width = prefix + max(tail_a, tail_b)
    table = torch.full((2, width), -1, dtype=torch.int64)
    table[0, : prefix + tail_a] = torch.cat([shared, own_a])
    table[1, : prefix + tail_b] = torch.cat([shared, own_b])
    for rank in range(kvp):
        local = layout.local_page_table(table, rank, kvp)
        n_shared = layout.local_num_pages(prefix, rank, 1, kvp)  # prefix pages this rank owns
        assert torch.equal(local[0, :n_shared], local[1, :n_shared])
        assert torch.equal(local[0, :n_shared], shared[rank::kvp])


@given(width=st.integers(0, 50), kvp=KVP, batch=st.integers(1, 4))
def test_local_page_tables_partition_columns(width, kvp, batch):
    table = torch.arange(batch * width).reshape(batch, width)
    parts = [layout.local_page_table(table, r, kvp) for r in range(kvp)]
    assert sum(p.shape[1] for p in parts) == width
    for r, part in enumerate(parts):
        for i in range(part.shape[1]):
            assert torch.equal(part[:, i], table[:, i * kvp + r])  # local page i = logical i*kvp+r


@given(page_id=st.integers(0, 10**6), kvp=KVP)
def test_colored_ids_give_dense_distinct_slots(page_id, kvp):
    slot = layout.colored_page_id_to_slot(page_id, kvp)
    assert slot * kvp + layout.page_owner(page_id, kvp) == page_id


@given(lens=st.lists(LEN, min_size=1, max_size=8), page_size=PAGE, kvp=KVP)
def test_tensor_and_int_paths_agree(lens, page_size, kvp):
    seq = torch.tensor(lens, dtype=torch.int32)
    table = layout.local_seq_lens_all(seq, page_size, kvp)
    assert table.shape == (kvp, len(lens)) and table.dtype == torch.int32
    assert torch.equal(table.sum(0), seq)
    for r in range(kvp):
        assert table[r].tolist() == [layout.local_seq_len(n, r, page_size, kvp) for n in lens]
    owners = layout.append_owner(seq, page_size, kvp)
    assert owners.tolist() == [layout.append_owner(n, page_size, kvp) for n in lens]


@given(total=st.integers(0, 100), parts=st.integers(1, 12))
def test_shard_bounds(total, parts):
    bounds = layout.shard_bounds(total, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: layout.local_seq_len(5, 2, 4, 2), "kvp rank 2"),
        (lambda: layout.local_seq_len(5, 0, 0, 2), "page_size must be >= 1"),
        (lambda: layout.page_owner(3, 0), "kvp must be >= 1"),
        (lambda: layout.local_page_table(torch.zeros(3), 0, 2), r"\[B, max_pages\]"),
        (lambda: layout.shard_bounds(4, 0), "parts must be >= 1"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@given(ids=st.lists(st.integers(8, 10**5), max_size=40, unique=True), kvp=KVP)
def test_transfer_page_slots_partition_the_pages(ids, kvp):
    """Every transferred page lands on exactly one decode rank, at its colored slot."""
    page_ids = torch.tensor(ids, dtype=torch.int64)
    src = torch.arange(len(ids)) + 1000
    received = {}
    for r in range(kvp):
        slots = layout.transfer_page_slots(page_ids, r, kvp)
        assert slots.shape == page_ids.shape
        kept_src, kept_dst = layout.owned_transfer_pairs(src, slots)
        for s, d in zip(kept_src.tolist(), kept_dst.tolist()):
            i = s - 1000
            assert s not in received, "a page went to two ranks"
            assert ids[i] % kvp == r and d == ids[i] // kvp
            received[s] = r
    assert sorted(received) == src.tolist()


@pytest.mark.parametrize("kvp", [1, 2, 3, 4])
def test_transfer_page_slots_exhaustive_and_ordered(kvp):
    ids = torch.arange(kvp, 7 * kvp)
    for r in range(kvp):
        slots = layout.transfer_page_slots(ids, r, kvp)
        expect = [i // kvp if i % kvp == r else layout.SINK_SLOT for i in range(kvp, 7 * kvp)]
        assert slots.tolist() == expect
        assert all(s >= 1 for s in slots.tolist() if s != layout.SINK_SLOT)  # never the sink
        src, dst = layout.owned_transfer_pairs(ids, slots)
        assert src.tolist() == [i for i in range(kvp, 7 * kvp) if i % kvp == r]  # order kept
        assert dst.tolist() == [i // kvp for i in src.tolist()]


def test_transfer_page_slots_reject_bad_input():
    with pytest.raises(ValueError, match="colored page ids"):
        layout.transfer_page_slots(torch.tensor([3, 1]), 0, 2)  # id 1 < kvp: not a colored id
    with pytest.raises(ValueError, match="rank"):
        layout.transfer_page_slots(torch.tensor([3]), 2, 2)
    with pytest.raises(ValueError, match=r"\[n\]"):
        layout.transfer_page_slots(torch.full((2, 2), 5), 0, 2)
    with pytest.raises(ValueError, match="equal-length"):
        layout.owned_transfer_pairs(torch.arange(3), torch.arange(2))
