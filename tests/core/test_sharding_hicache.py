"""Property tests of the HiCache host-tier index math (sharding.py): host page ids colored like
device page ids, so a backup or load-back pairs pages of one color and each KVP rank copies
only its own pages between its local device and host rows."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sglang_helix import sharding as layout

KVP = st.integers(1, 8)
PAGE = st.sampled_from([1, 2, 4, 16])
I64 = torch.int64


def colored_ids(draw_ids, kvp):
    """Distinct colored page ids (>= kvp: ids below are every rank's padding slot)."""
    return torch.tensor(sorted(set(draw_ids)), dtype=I64) + kvp


@given(ids=st.lists(st.integers(0, 10**5), max_size=30), page_size=PAGE, kvp=KVP)
def test_page_ids_and_locs_round_trip(ids, page_size, kvp):
    pages = colored_ids(ids, kvp)
    locs = layout.locs_of_page_ids(pages, page_size)
    assert locs.shape == (len(pages) * page_size,)
    assert torch.equal(locs.view(-1, page_size) - locs.view(-1, page_size)[:, :1],
                       torch.arange(page_size).expand(len(pages), -1))  # P consecutive locs a page
    assert torch.equal(layout.page_ids_of_locs(locs, page_size), pages)


@given(ids=st.lists(st.integers(0, 10**4), min_size=1, max_size=30), page_size=PAGE, kvp=KVP)
def test_owned_local_rows_partition_the_tokens(ids, page_size, kvp):
    """Every token of colored pages is stored by exactly one KVP rank (its page's color), at a
    distinct row of that rank's pool, never in its padding page, in token order."""
    pages = colored_ids(ids, kvp)
    locs = layout.locs_of_page_ids(pages, page_size)
    owners = torch.full_like(locs, -1)
    for rank in range(kvp):
        owned, rows = layout.owned_local_rows(locs, rank, page_size, kvp)
        assert not bool((owners[owned] >= 0).any()), "a token on two ranks"
        owners[owned] = rank
        assert torch.equal(owned, layout.page_owner(locs // page_size, kvp) == rank)
        assert len(set(rows.tolist())) == len(rows) and bool((rows >= page_size).all())
        slots = layout.colored_page_id_to_slot(locs[owned] // page_size, kvp)
        assert torch.equal(rows, slots * page_size + locs[owned] % page_size)
    assert bool((owners >= 0).all())


@given(first=st.integers(0, 200), pages=st.integers(0, 40), kvp=KVP)
def test_cyclic_colors_are_the_logical_pages_owners(first, pages, kvp):
    colors = layout.cyclic_colors(first, pages, kvp)
    assert colors.tolist() == [layout.page_owner(first + i, kvp) for i in range(pages)]


@given(first=st.integers(0, 100), pages=st.integers(1, 24), page_size=PAGE, kvp=KVP,
       seed=st.integers(0, 2**16))
def test_backup_pairs_keep_colors_and_each_rank_moves_only_its_tokens(first, pages, page_size, kvp, seed):
    """A cached node of `pages` consecutive logical pages from logical page `first`: its device ids
    have the colors of their positions; host ids drawn with the same colors (any free ones) pair
    up so that, on every rank, the host and device sides select the same tokens, and every token
    is moved by exactly one rank."""
    g = torch.Generator().manual_seed(seed)
    colors = layout.cyclic_colors(first, pages, kvp)

    def ids_of(colors):  # a distinct free id of each color, in a shuffled id space
        slots = torch.randperm(4 * pages + 4, generator=g)[:pages] + 1
        return slots * kvp + colors

    device = layout.locs_of_page_ids(ids_of(colors), page_size)
    host = layout.locs_of_page_ids(ids_of(colors), page_size)
    moved = torch.zeros(len(device), dtype=I64)
    for rank in range(kvp):
        owned_h, rows_h = layout.owned_local_rows(host, rank, page_size, kvp)
        owned_d, rows_d = layout.owned_local_rows(device, rank, page_size, kvp)
        assert torch.equal(owned_h, owned_d) and len(rows_h) == len(rows_d)
        assert torch.equal(rows_h % page_size, rows_d % page_size)  # same offsets in the page
        moved += owned_h.to(I64)
        positions = torch.arange(first * page_size, (first + pages) * page_size)
        assert torch.equal(owned_d, layout.token_owner(positions, page_size, kvp) == rank)
    assert torch.equal(moved, torch.ones_like(moved))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="whole pages of 4 tokens"):
        layout.page_ids_of_locs(torch.arange(6), 4)
    with pytest.raises(ValueError, match="rank"):
        layout.owned_local_rows(torch.arange(8), 2, 4, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        layout.cyclic_colors(0, -1, 2)
