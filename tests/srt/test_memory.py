"""Helix colored allocator and KV pools against SGLang 0.5.23's real classes, on CPU.

Objects are built directly with tiny sizes (no server). "Ranks" are separate pool/allocator
instances fed the same operation stream, as the SPMD scheduler does on every rank.
"""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace

import pytest
from helpers import NEEDS_SGLANG
import torch

pytestmark = NEEDS_SGLANG

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub as sgl_kernel_cpu_stub

    sgl_kernel_cpu_stub.install()
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    from sglang_helix.srt import info
    from sglang_helix.srt.cpu import fp8_kv_fix
    from sglang_helix.srt.memory import allocator as alloc_mod
    from sglang_helix.srt.memory import hooks as mem_hooks
    from sglang_helix.srt.memory import pools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_helix.attention import merge_partials, partial_attention_gqa, partial_attention_mla
from sglang_helix.kernels.reference import full_attention_ref
from sglang_helix import sharding
from sglang_helix.sharding import page_owner

P = 4
I64 = torch.int64


def make_alloc(kvp: int, size: int = 256, page_size: int = P, need_sort: bool = False):
    return alloc_mod.HelixPagedAllocator(size, page_size, torch.float32, "cpu", None, need_sort, kvp=kvp)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I64)


class Sim:
    """A request table driving one allocator like SGLang's scheduler (req_to_token by position)."""

    def __init__(self, alloc):
        self.alloc, self.reqs = alloc, {}

    def extend(self, items):
        """items: [(rid, prefix_locs or None, new_len)]; a request with prefix shares its locs."""
        prefix = [len(p) if p is not None else 0 for _, p, _ in items]
        seq = [pl + n for pl, (_, _, n) in zip(prefix, items)]
        last = [int(p[-1]) if p is not None and len(p) else -1 for _, p, _ in items]
        out = self.alloc.alloc_extend(t(prefix), t(prefix), t(seq), t(seq), t(last), sum(seq) - sum(prefix))
        if out is None:
            return None
        start = 0
        for (rid, p, n), pl in zip(items, prefix):
            head = p if p is not None else torch.empty(0, dtype=I64)
            self.reqs[rid] = torch.cat([head, out[start : start + n]])
            start += n
        return out

    def decode(self, rids):
        seq = t([len(self.reqs[r]) + 1 for r in rids])
        last = t([int(self.reqs[r][-1]) for r in rids])
        out = self.alloc.alloc_decode(seq, seq, last)
        if out is not None:
            for r, loc in zip(rids, out):
                self.reqs[r] = torch.cat([self.reqs[r], loc.view(1)])
        return out


def check_colors(locs: torch.Tensor, kvp: int, page_size: int = P) -> None:
    """Token at position i: its page has color (i // P) % KVP and its offset is i % P."""
    pos = torch.arange(len(locs))
    assert torch.equal(page_owner(locs // page_size, kvp), (pos // page_size) % kvp)
    assert torch.equal(locs % page_size, pos % page_size)
    pages = locs // page_size  # one page per logical page of the request
    assert torch.equal(pages[:: page_size].repeat_interleave(page_size)[: len(locs)], pages)


# ----------------------------------------------------------------------------- allocator


def test_is_sglang_paged_allocator_and_refuses_positionless():
    alloc = make_alloc(2)
    assert isinstance(alloc, PagedTokenToKVPoolAllocator)
    with pytest.raises(pools.HelixPoolError, match="--page-size"):
        alloc.alloc(8)
    with pytest.raises(pools.HelixPoolError, match="--page-size >= 2"):
        make_alloc(2, page_size=1)


@pytest.mark.parametrize("kvp", [1, 2, 3])
def test_extend_colors_fresh_ragged(kvp):
    sim = Sim(make_alloc(kvp))
    sim.extend([("a", None, 1), ("b", None, 9), ("c", None, 4), ("d", None, 17)])
    for locs in sim.reqs.values():
        check_colors(locs, kvp)
    every = torch.cat(list(sim.reqs.values()))
    assert len(torch.unique(every)) == len(every)
    assert int((every // P).min()) >= kvp  # ids < KVP are every rank's padding slot


@pytest.mark.parametrize("kvp", [2, 3])
@pytest.mark.parametrize("prefix_len", [4, 8, 12])  # the radix cache matches whole pages
def test_extend_with_cached_prefix(kvp, prefix_len):
    sim = Sim(make_alloc(kvp))
    sim.extend([("a", None, 14)])
    sim.extend([("b", sim.reqs["a"][:prefix_len], 11), ("c", None, 3)])
    for locs in sim.reqs.values():
        check_colors(locs, kvp)
    assert torch.equal(sim.reqs["b"][:prefix_len], sim.reqs["a"][:prefix_len])
    fresh_b = set((sim.reqs["b"][prefix_len:] // P).tolist())
    assert not fresh_b & set((sim.reqs["a"] // P).tolist())
    assert not fresh_b & set((sim.reqs["c"] // P).tolist())


@pytest.mark.parametrize("kvp", [2, 3])
@pytest.mark.parametrize("chunks", [[5, 6, 9], [4, 4, 1], [1, 1, 13], [7, 1, 2]])
def test_extend_chunked_continuation(kvp, chunks):
    """A request extending its own row (chunked prefill): a partly filled last page is continued."""
    sim = Sim(make_alloc(kvp))
    sim.extend([("a", None, chunks[0]), ("z", None, 6)])
    for n in chunks[1:]:
        sim.extend([("a", sim.reqs["a"], n), ("y" + str(n), None, 3)])
    check_colors(sim.reqs["a"], kvp)
    every = torch.cat(list(sim.reqs.values()))
    assert len(torch.unique(every)) == len(every)


@pytest.mark.parametrize("kvp", [2, 3])
def test_decode_staggered_append(kvp):
    sim = Sim(make_alloc(kvp))
    sim.extend([("a", None, 3), ("b", None, 6), ("c", None, 8)])
    for _ in range(11):  # every request crosses several page boundaries, at different steps
        assert sim.decode(["a", "b", "c"]) is not None
    for locs in sim.reqs.values():
        check_colors(locs, kvp)
    every = torch.cat(list(sim.reqs.values()))
    assert len(torch.unique(every)) == len(every)


def test_two_ranks_agree_and_share_prefix_ids():
    ranks = [Sim(make_alloc(2)) for _ in range(2)]
    for sim in ranks:
        sim.extend([("a", None, 13)])
        sim.extend([("b", sim.reqs["a"][:8], 6)])
        sim.decode(["a", "b"])
        sim.alloc.free(sim.reqs.pop("a")[8:])
    assert all(torch.equal(ranks[0].reqs[r], ranks[1].reqs[r]) for r in ranks[0].reqs)
    assert torch.equal(ranks[0].alloc.get_all_free_pages(), ranks[1].alloc.get_all_free_pages())
    check_colors(ranks[0].reqs["b"], 2)


@pytest.mark.parametrize("need_sort", [False, True])
@pytest.mark.parametrize("how", ["free", "segment", "group", "page_ids"])
def test_free_returns_every_color(need_sort, how):
    alloc = make_alloc(3, need_sort=need_sort)
    start_counts, start_avail = alloc.color_free_counts(), alloc.available_size()
    sim = Sim(alloc)
    sim.extend([("a", None, 10), ("b", None, 7)])
    sim.extend([("c", sim.reqs["a"][:8], 5)])
    for _ in range(6):
        sim.decode(["a", "b", "c"])
    assert alloc.color_free_counts() != start_counts
    # a's full row owns the shared prefix (as the radix cache would); c frees only its tail
    frees = [sim.reqs["a"], sim.reqs["b"], sim.reqs["c"][8:]]
    if how == "free":
        for f in frees:
            alloc.free(f)
    elif how == "segment":
        alloc.free_segments([(sim.reqs["a"], 0)])
        alloc.free_segment(sim.reqs["b"], start_pos=0)
        alloc.free_segment(sim.reqs["c"][8:], start_pos=8)
    elif how == "group":
        alloc.free_group_begin()
        for f in frees:
            alloc.free(f)
        alloc.free_group_end()
    else:
        alloc.free_page_ids(torch.unique(torch.cat(frees) // P))
    assert alloc.color_free_counts() == start_counts
    assert alloc.available_size() == start_avail
    alloc._debug_check_no_duplicate_pages()
    alloc.merge_and_sort_free()
    assert torch.equal(torch.sort(alloc.get_all_free_pages())[0], torch.sort(make_alloc(3).get_all_free_pages())[0])


def test_out_of_color_returns_none_and_takes_nothing():
    alloc = make_alloc(2, size=32)  # 8 pages: 4 per color, ids 2..9
    sim = Sim(alloc)
    assert sim.extend([("a", None, 4 * P)]) is not None  # pages j=0..3: 2 of each color
    before = alloc.color_free_counts()
    assert sim.extend([("b", None, 5 * P)]) is None  # needs 3 of color 0, only 2 left
    assert alloc.color_free_counts() == before
    assert sim.extend([("c", None, 4 * P)]) is not None


def test_capacity_hooks_are_color_exact():
    alloc = make_alloc(4, size=64)  # 16 pages, 4 per color
    assert alloc.available_size() == 64
    demand = alloc.get_extend_allocation_demand(t([0]), t([P + 1]), conservative_num_tokens=0, shard_size=1)
    assert demand == 4 * 1 * P  # pages 0 and 1: one page of each of two colors
    sim = Sim(alloc)
    sim.extend([(i, None, P) for i in range(4)])  # four requests, all page 0: color 0 x4
    assert alloc.color_free_counts() == [0, 4, 4, 4]
    assert alloc.available_size() == 0
    req = lambda n: SimpleNamespace(kv=SimpleNamespace(kv_committed_len=n))  # noqa: E731
    none = SimpleNamespace(is_none=lambda: True)
    alloc.free(torch.cat(list(sim.reqs.values())))
    # two requests opening page 1 (color 1) need 2 pages of one color: 4 x 2 x P logical tokens
    assert alloc.check_decode_capacity(num_tokens=2 * P, tree_cache=None, requests=[req(P), req(P)],
                                       spec_algorithm=none)
    Sim(alloc).extend([(9, None, 3 * P)] * 1)  # takes one page of colors 0, 1, 2
    Sim(alloc).extend([(i, None, 2 * P) for i in range(3)])  # three more of colors 0 and 1
    assert alloc.color_free_counts()[1] == 0
    assert not alloc.check_decode_capacity(num_tokens=P, tree_cache=None, requests=[req(P)], spec_algorithm=none)
    assert alloc.check_decode_capacity(num_tokens=0, tree_cache=None, requests=[req(5)], spec_algorithm=none)


def test_clear_and_resize():
    alloc = make_alloc(2, size=64)
    Sim(alloc).extend([("a", None, 9)])
    alloc.clear()
    assert alloc.color_free_counts() == [8, 8]

    class Cfg:
        max_total_num_tokens = 128

    alloc.resize(Cfg)
    assert alloc.color_free_counts() == [16, 16] and alloc.available_size() == 128


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kvp=st.integers(1, 4), need_sort=st.booleans(), seed=st.integers(0, 2**31), steps=st.integers(1, 30))
def test_allocator_invariants_property(kvp, need_sort, seed, steps):
    """Random extend (fresh / shared prefix) / decode / free streams on two mirrored ranks."""
    rng = random.Random(seed)
    ranks = [Sim(make_alloc(kvp, size=48 * kvp, need_sort=need_sort)) for _ in range(2)]
    total = ranks[0].alloc.color_free_counts()
    for step in range(steps):
        op, live = rng.random(), sorted(ranks[0].reqs)
        if op < 0.45 or not live:
            src = rng.choice(live) if live and rng.random() < 0.6 else None
            if src is not None and rng.random() < 0.4:  # chunked continuation of src's own row
                rid, plen = src, len(ranks[0].reqs[src])
            else:  # new request, maybe matching a page-aligned prefix of src (radix hit)
                rid = step
                plen = rng.randrange(0, len(ranks[0].reqs[src]) // P + 1) * P if src is not None else 0
            n = rng.randint(1, 13)
            demand = ranks[0].alloc.get_extend_allocation_demand(t([plen]), t([plen + n]),
                                                                 conservative_num_tokens=0, shard_size=1)
            fits = ranks[0].alloc.available_size() >= demand
            outs = [s.extend([(rid, s.reqs[src][:plen] if src is not None else None, n)]) for s in ranks]
            if fits:
                assert outs[0] is not None  # available_size is a safe admission gate
        elif op < 0.75:
            outs = [s.decode(live) for s in ranks]
        else:
            rid = rng.choice(live)
            for s in ranks:
                locs = s.reqs.pop(rid)
                others = torch.cat([v for v in s.reqs.values()] or [torch.empty(0, dtype=I64)])
                keep = torch.isin(locs // P, others // P)  # pages still referenced stay allocated
                s.alloc.free(locs[~keep])
            outs = [None, None]
        assert (outs[0] is None) == (outs[1] is None) and (outs[0] is None or torch.equal(*outs))
    position_of: dict = {}  # a loc shared by several rows (radix prefix) sits at one position
    for locs in ranks[0].reqs.values():
        for pos, loc in enumerate(locs.tolist()):
            assert position_of.setdefault(loc, pos) == pos
    for s in ranks:
        for locs in s.reqs.values():
            check_colors(locs, kvp)
    a0, a1 = ranks[0].alloc, ranks[1].alloc
    assert a0.color_free_counts() == a1.color_free_counts()
    live_pages = torch.unique(torch.cat([v for v in ranks[0].reqs.values()] or [torch.empty(0, dtype=I64)]) // P)
    free = a0.get_all_free_pages()
    assert len(torch.unique(free)) == len(free)
    assert not torch.isin(live_pages, free).any()
    used = torch.bincount(page_owner(live_pages, kvp), minlength=kvp).tolist()
    assert [u + f for u, f in zip(used, a0.color_free_counts())] == total


# ----------------------------------------------------------------------------- pools


MHA_KW = dict(dtype=torch.float32, head_dim=8, v_head_dim=6, layer_num=2, device="cpu",
              enable_memory_saver=False)
MLA_KW = dict(dtype=torch.float32, kv_lora_rank=16, qk_rope_head_dim=4, layer_num=2, device="cpu",
              enable_memory_saver=False)


def mha_pool(kvp, rank, size=256, heads=2):
    return pools.HelixMHATokenToKVPool(size, P, head_num=heads, kvp=kvp, kvp_rank=rank, **MHA_KW)


def mla_pool(kvp, rank, size=256):
    return pools.HelixMLATokenToKVPool(size, P, kvp=kvp, kvp_rank=rank, **MLA_KW)


def total_bytes(pool) -> int:
    b = pool.get_kv_size_bytes()
    return int(sum(b) if isinstance(b, tuple) else b)


@pytest.mark.parametrize("kvp", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [64, 100, 256])
def test_pool_bytes_are_one_over_kvp(kvp, size):
    off_mha = total_bytes(MHATokenToKVPool(size // P * P, P, head_num=2, **MHA_KW))
    off_mla = total_bytes(MLATokenToKVPool(size // P * P, P, **MLA_KW))
    for off, helix in ((off_mha, mha_pool(kvp, kvp - 1, size)), (off_mla, mla_pool(kvp, kvp - 1, size))):
        page_bytes = off // (size // P + 1)
        assert abs(total_bytes(helix) - off / kvp) <= page_bytes
        assert helix.size == sharding.pages_per_color(size, P, kvp) * P


def test_helix_logical_tokens_fit_the_budget():
    for stock, sb, hb, kvp in [(1000, 64, 128, 2), (4096, 576, 576, 4), (64, 32, 32, 1)]:
        logical = sharding.helix_logical_tokens(stock, sb, hb, P, kvp)
        assert logical % (kvp * P) == 0
        local_bytes = (sharding.local_pool_tokens(logical, P, kvp) + P) * hb
        assert local_bytes <= (stock + P) * sb < local_bytes + kvp * P * hb + P * hb


def stored_batch(kvp, seqs, prefix_of=None):
    """Allocate a ragged batch (request 1 shares request 0's first 8 tokens if prefix_of)."""
    sim = Sim(make_alloc(kvp))
    sim.extend([(0, None, seqs[0])])
    rest = [(i, sim.reqs[0][:8] if (prefix_of and i == 1) else None, n - (8 if prefix_of and i == 1 else 0))
            for i, n in enumerate(seqs) if i]
    sim.extend(rest)
    return sim


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_set_kv_buffer_writes_only_owned(kind):
    kvp = 3
    sim = stored_batch(kvp, [13, 22, 5], prefix_of=True)
    pools = [mha_pool(kvp, r) if kind == "mha" else mla_pool(kvp, r) for r in range(kvp)]
    locs = torch.cat([sim.reqs[0], sim.reqs[1][8:], sim.reqs[2]])
    g = torch.Generator().manual_seed(0)
    if kind == "mha":
        k, v = torch.randn(len(locs), 2, 8, generator=g), torch.randn(len(locs), 2, 6, generator=g)
    else:
        k = torch.randn(len(locs), 1, 20, generator=g)
    for r, pool in enumerate(pools):
        if kind == "mha":
            pool.set_kv_buffer(None, locs, k, v, layer_id_override=1)
            bufs = [pool.k_buffer[1], pool.v_buffer[1]]
            srcs = [k, v]
        else:
            pool.set_mla_kv_buffer(None, locs, k[..., :16], k[..., 16:], layer_id_override=1)
            bufs, srcs = [pool.kv_buffer[1]], [k]
        rows, owned = pool.local_rows(locs)
        assert torch.equal(owned, page_owner(locs // P, kvp) == r)
        for buf, src in zip(bufs, srcs):
            assert torch.equal(buf[rows[owned]], src[owned])  # atol=0 read-back
            touched = torch.zeros(buf.shape[0], dtype=torch.bool)
            touched[rows[owned]] = True
            touched[:P] = True  # padding page takes the dropped rows
            assert not buf[~touched].any()  # nothing else written
        if kind == "mha":
            assert not pools[r].k_buffer[0].any()  # other layer untouched


def _dense_case(kvp, heads_q, kv_heads, seqs, seed=1):
    g = torch.Generator().manual_seed(seed)
    sim = stored_batch(kvp, seqs, prefix_of=True)
    max_len = max(seqs)
    req_to_token = torch.zeros(len(seqs), max_len + 2 * P, dtype=I64)
    for i, locs in sim.reqs.items():
        req_to_token[i, : len(locs)] = locs
    q = torch.randn(len(seqs), heads_q, 8, generator=g)
    return sim, req_to_token, q, g


@pytest.mark.parametrize("kvp,tpa", [(2, 1), (3, 1), (2, 2)])
def test_gqa_through_pool_matches_full_attention(kvp, tpa):
    """Pool + local tables + partial attention + merge == fp32 full attention per TPA group."""
    seqs, hq, kh = [13, 22, 5, 1], 4, 2
    sim, r2t, q, g = _dense_case(kvp, hq, kh, seqs)
    seq_t = torch.tensor(seqs)
    keys = {i: torch.randn(n, kh, 8, generator=g) for i, n in enumerate(seqs)}
    vals = {i: torch.randn(n, kh, 6, generator=g) for i, n in enumerate(seqs)}
    keys[1][:8], vals[1][:8] = keys[0][:8], vals[0][:8]  # shared prefix = same KV
    scale = 8 ** -0.5
    for tpa_rank in range(tpa):
        hs = slice(tpa_rank * kh // tpa, (tpa_rank + 1) * kh // tpa)
        qs = q[:, tpa_rank * hq // tpa : (tpa_rank + 1) * hq // tpa]
        outs, lses = [], []
        for r in range(kvp):
            pool = mha_pool(kvp, r, heads=kh // tpa)
            for i in range(len(seqs)):
                pool.set_kv_buffer(None, sim.reqs[i], keys[i][:, hs], vals[i][:, hs], layer_id_override=0)
            table, lens = pool.local_decode_tables(r2t, seq_t)
            kc, vc = pool.get_paged_kv(0)
            out, lse = partial_attention_gqa(qs, kc, vc, table, lens, scale, impl="reference")
            outs.append(out)
            lses.append(lse)
        merged, _ = merge_partials(torch.stack(outs), torch.stack(lses))
        group = qs.shape[1] // (kh // tpa)
        for i in range(len(seqs)):
            k_full = keys[i][:, hs].repeat_interleave(group, dim=1)
            v_full = vals[i][:, hs].repeat_interleave(group, dim=1)
            ref, _ = full_attention_ref(qs[i], k_full, v_full, scale)
            torch.testing.assert_close(merged[i], ref, atol=1e-5, rtol=1e-5)


def test_mla_through_pool_matches_full_attention():
    kvp, seqs, heads = 3, [13, 22, 5], 4
    sim, r2t, q, g = _dense_case(kvp, heads, 1, seqs)
    seq_t = torch.tensor(seqs)
    lat = {i: torch.randn(n, 1, 20, generator=g) for i, n in enumerate(seqs)}
    lat[1][:8] = lat[0][:8]
    q_lat, q_rope = torch.randn(len(seqs), heads, 16, generator=g), torch.randn(len(seqs), heads, 4, generator=g)
    scale = 0.3
    outs, lses = [], []
    for r in range(kvp):
        pool = mla_pool(kvp, r)
        for i in range(len(seqs)):
            pool.set_mla_kv_buffer(None, sim.reqs[i], lat[i][..., :16], lat[i][..., 16:], layer_id_override=0)
        table, lens = pool.local_decode_tables(r2t, seq_t)
        out, lse = partial_attention_mla(q_lat, q_rope, pool.get_paged_kv(0), table, lens, scale, impl="reference")
        outs.append(out)
        lses.append(lse)
    merged, _ = merge_partials(torch.stack(outs), torch.stack(lses))
    for i in range(len(seqs)):
        qf = torch.cat([q_lat[i], q_rope[i]], -1)
        k = lat[i].expand(-1, heads, -1)
        ref, _ = full_attention_ref(qf, k, lat[i][..., :16].expand(-1, heads, -1), scale)
        torch.testing.assert_close(merged[i], ref, atol=1e-5, rtol=1e-5)


def test_pool_refuses_cross_rank_paths():
    pool = mla_pool(2, 0)
    with pytest.raises(pools.HelixPoolError, match="helix attention backend attends a cached prefix where it lies"):
        pool.get_mla_kv_buffer(None, t([8]))


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("rank", [0, 1])
def test_move_kv_cache_within_a_rank(kind, rank):
    """Speculative accept (GQA and MLA pools): moves inside one page color copy this rank's rows
    of every layer buffer (others untouched, exactly), with no collective; a move across colors
    needs the KVP group (its all-gather: tests/srt/test_spec_tree_ranks.py)."""
    pool = mha_pool(2, rank) if kind == "mha" else mla_pool(2, rank)
    buffers = pool._kv_buffers()
    assert len(buffers) == (2 if kind == "mha" else 1) * pool.layer_num
    for buf in buffers:
        buf.copy_(torch.randn_like(buf))
    before = [buf.clone() for buf in buffers]
    src = t([2 * P, 2 * P + 1, 3 * P])  # pages 2 (color 0) and 3 (color 1)
    tgt = t([2 * P + 2, 2 * P + 3, 3 * P + 1])
    pool.move_kv_cache(tgt, src)
    rows_t, owned = pool.local_rows(tgt)
    rows_s, _ = pool.local_rows(src)
    assert int(owned.sum()) == (2 if rank == 0 else 1)
    for buf, old in zip(buffers, before):
        want = old.clone()
        want[rows_t[owned]] = old[rows_s[owned]]
        torch.testing.assert_close(buf, want, atol=0, rtol=0)
    moved = [buf.clone() for buf in buffers]
    pool.move_kv_cache(src, src)  # a chain accept: onto itself
    for buf, want in zip(buffers, moved):
        torch.testing.assert_close(buf, want, atol=0, rtol=0)
    with pytest.raises(pools.HelixPoolError, match="across KVP ranks needs the KVP group"):
        pool.move_kv_cache(t([3 * P]), t([2 * P]))


# ----------------------------------------------------------------------------- hooks


class _FakeKvc:
    def __init__(self, layout=None):
        class Args:
            pass

        self.server_args = Args()
        if layout is not None:
            self.server_args._helix_config = layout


def test_hooks_call_through_without_helix():
    called = []

    def original(kvc, **kwargs):
        called.append(kwargs)
        return "stock"

    kvc = _FakeKvc()
    assert mem_hooks._around_build_pool(original, kvc, sizes=None) == "stock"
    assert mem_hooks._around_build_allocator(original, kvc, token_to_kv_pool=None) == "stock"
    assert mem_hooks._around_logical_capacity(original, kvc, max_total_num_tokens=7) == "stock"
    assert len(called) == 3


def test_allocator_hook_builds_helix_allocator(monkeypatch):
    from sglang_helix.config import HelixConfig

    monkeypatch.setattr(mem_hooks, "_need_sort", lambda: False)  # no SGLang runtime context here

    kvc = _FakeKvc(HelixConfig(kvp=2, tpa=1, num_heads=4, num_kv_heads=2, page_size=P))
    kvc.page_size, kvc.kv_cache_dtype, kvc.device = P, torch.float32, "cpu"
    pool = mha_pool(2, 1, size=128)
    alloc = mem_hooks._around_build_allocator(None, kvc, token_to_kv_pool=pool, token_to_kv_pool_allocator=None)
    assert isinstance(alloc, alloc_mod.HelixPagedAllocator) and alloc.kvp == 2 and alloc.size == 128
    assert alloc.get_kvcache() is pool


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_draft_worker_shares_the_target_allocator(kind, monkeypatch):
    """NEXTN: the draft worker's own Helix pool behind the target's allocator, passed through to
    SGLang's shared-allocator branch; refused when a loc could land on another rank's rows."""
    from sglang_helix.config import HelixConfig

    monkeypatch.setattr(mem_hooks, "_need_sort", lambda: False)
    kvc = _FakeKvc(HelixConfig(kvp=2, tpa=1, num_heads=4, num_kv_heads=1 if kind == "mla" else 2,
                               mla=kind == "mla", page_size=P))
    kvc.page_size, kvc.kv_cache_dtype, kvc.device = P, torch.float32, "cpu"
    make = mha_pool if kind == "mha" else mla_pool
    target = make(2, 1, size=128)
    shared = mem_hooks._around_build_allocator(None, kvc, token_to_kv_pool=target, token_to_kv_pool_allocator=None)

    def original(kvc, **kwargs):
        return kwargs["token_to_kv_pool_allocator"]

    draft = make(2, 1, size=128)
    assert mem_hooks._around_build_allocator(original, kvc, token_to_kv_pool=draft,
                                             token_to_kv_pool_allocator=shared) is shared
    for bad, match in ((make(2, 0, size=128), "draft pool KVP rank 0/2 != the target's 1/2"),
                       (make(2, 1, size=64), "draft pool holds 64 logical tokens < .* 128"),
                       (draft, "shares a PagedTokenToKVPoolAllocator")):
        other = (PagedTokenToKVPoolAllocator(128, P, torch.float32, "cpu", target, False)
                 if "Paged" in match else shared)
        with pytest.raises(pools.HelixPoolError, match=match):
            mem_hooks._around_build_allocator(original, kvc, token_to_kv_pool=bad, token_to_kv_pool_allocator=other)


# ----------------------------------------------------------------------------- fp8 KV pages

FP8 = torch.float8_e4m3fn


def _pool(kind, dtype, kvp=2, rank=0, size=256):
    kw = dict(MHA_KW if kind == "mha" else MLA_KW, dtype=dtype)
    if kind == "mha":
        return pools.HelixMHATokenToKVPool(size, P, head_num=2, kvp=kvp, kvp_rank=rank, **kw)
    return pools.HelixMLATokenToKVPool(size, P, kvp=kvp, kvp_rank=rank, **kw)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_fp8_pool_is_one_byte_per_element_like_sglangs(kind):
    """Helix fp8 pages: uint8 storage (as SGLang stores fp8), half a bf16 pool's bytes, 1/KVP of
    SGLang's own fp8 pool; the paged views read as the fp8 dtype."""
    fp8, bf16 = _pool(kind, FP8), _pool(kind, torch.bfloat16)
    assert fp8.store_dtype == torch.uint8 and fp8.dtype == FP8
    assert total_bytes(fp8) * 2 == total_bytes(bf16)
    stock_cls, kw = (MHATokenToKVPool, dict(MHA_KW, head_num=2)) if kind == "mha" else (MLATokenToKVPool, MLA_KW)
    stock = total_bytes(stock_cls(256, P, **dict(kw, dtype=FP8)))
    assert abs(total_bytes(fp8) - stock / 2) <= stock // (256 // P + 1)
    views = fp8.get_paged_kv(0)
    assert all(v.dtype == FP8 for v in (views if kind == "mha" else (views,)))


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_fp8_writes_follow_sglangs_scale_convention(kind):
    """Stored = (x / layer scale).to(fp8) on the owner's rows (SGLang's convention); the caller's
    tensors are left intact (SGLang's own pool divides them in place)."""
    kvp = 2
    sim = stored_batch(kvp, [13, 22, 5], prefix_of=True)
    locs = torch.cat([sim.reqs[0], sim.reqs[1][8:], sim.reqs[2]])
    g = torch.Generator().manual_seed(2)
    ks, vs = torch.tensor(0.37), torch.tensor(1.9)
    for rank in range(kvp):
        pool = _pool(kind, FP8, kvp, rank)
        rows, owned = pool.local_rows(locs)
        if kind == "mha":
            k, v = torch.randn(len(locs), 2, 8, generator=g), torch.randn(len(locs), 2, 6, generator=g)
            kept = (k.clone(), v.clone())
            pool.set_kv_buffer(None, locs, k, v, ks, vs, layer_id_override=1)
            assert torch.equal(k, kept[0]) and torch.equal(v, kept[1])
            got = pool.get_kv_buffer(1)
            for buf, src, s in ((got[0], k, ks), (got[1], v, vs)):
                assert buf.dtype == FP8
                assert torch.equal(buf[rows[owned]].view(torch.uint8), (src[owned] / s).to(FP8).view(torch.uint8))
        else:
            k = torch.randn(len(locs), 1, 20, generator=g)
            kept = k.clone()
            pool.set_kv_buffer(None, locs, k, None, layer_id_override=1, k_scale=ks)
            assert torch.equal(k, kept)
            want = (k[owned] / ks).to(FP8).view(torch.uint8)
            assert torch.equal(pool.kv_buffer[1][rows[owned]], want)
            other = _pool(kind, FP8, kvp, rank)
            other.set_mla_kv_buffer(None, locs, k[..., :16], k[..., 16:], layer_id_override=1, k_scale=ks)
            assert torch.equal(other.kv_buffer[1], pool.kv_buffer[1])


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_server_info_bytes_follow_the_kv_dtype(kind, monkeypatch):
    """/server_info's helix bytes per rank for fp8 pages are half those of bf16 pages, for the
    Helix rank and for the plain-TP comparison alike, and name the dtype."""
    from sglang_helix.config import HelixConfig

    cfg = HelixConfig(kvp=2, tpa=1, num_heads=4, num_kv_heads=1 if kind == "mla" else 2, mla=kind == "mla",
                      page_size=P)
    monkeypatch.setattr(info.state, "current_config", lambda: cfg)
    states = {}
    for dtype in (FP8, torch.bfloat16):
        pool = _pool(kind, dtype)
        alloc = alloc_mod.HelixPagedAllocator(256, P, dtype, "cpu", pool, False, kvp=2)
        states[dtype] = info.helix_kv_state(alloc)
    fp8, bf16 = states[FP8], states[torch.bfloat16]
    assert fp8["kv_cache_dtype"] == "float8_e4m3fn" and bf16["kv_cache_dtype"] == "bfloat16"
    for key in ("kv_bytes_per_rank", "plain_tp_kv_bytes_per_token", "plain_tp_kv_bytes_per_rank"):
        assert fp8[key] * 2 == bf16[key], key
    pool = _pool(kind, FP8)
    assert fp8["kv_bytes_per_rank"] == sum(b.numel() for b in (
        pool.kv_buffer if kind == "mla" else pool.k_buffer + pool.v_buffer))  # 1 byte each


class _FakeKvcDtype(_FakeKvc):
    def __init__(self, layout, dtype, name=None):
        super().__init__(layout)
        self.kv_cache_dtype, self.kv_cache_dtype_str = dtype, name


class _Stop(Exception):
    pass


def _configurator(layout, mla: bool):
    """Just what SGLang 0.5.23's KVCacheConfigurator.configure reads up to its pool sizing, which
    stops the run (raising _Stop with the KV dtype the sizing would see)."""
    def resolve(kvc, *args, **kwargs):
        raise _Stop(kvc.kv_cache_dtype)

    kvc = _FakeKvcDtype(layout, FP8)
    kvc.use_mla_backend, kvc.is_draft_worker = mla, False
    kvc.spec_algorithm = SimpleNamespace(is_none=lambda: True)
    kvc._resolve_memory_pool_config = lambda *a, **k: fp8_kv_fix.restore_kv_dtype(resolve, kvc, *a, **k)
    return kvc


@pytest.mark.parametrize("mla, refusal", [(True, "is only supported for MHA"), (False, "requires Intel AMX")])
def test_sglang_cpu_engine_refuses_fp8_kv_and_helix_steps_over_it(mla, refusal):
    """SGLang 0.5.23's own configure on this CPU (no AMX): fp8_e4m3 KV is refused with Helix off
    (MLA always; MHA without AMX / the intel_amx backend), which is why the fp8 server tests
    compare Helix on with an independent reference. Under Helix (the pool hooks' configure
    wrapper) the same configure goes past that check and sizes the pool with the real dtype."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang_helix.config import HelixConfig

    configure = KVCacheConfigurator.configure
    with pytest.raises(ValueError, match=f"CPU FP8 KV cache {refusal}"):
        configure(_configurator(None, mla), pre_model_load_memory=0)  # SGLang alone
    layout = HelixConfig(kvp=2, tpa=1, num_heads=4, num_kv_heads=1 if mla else 2, mla=mla, page_size=P)
    kvc = _configurator(layout, mla)
    with pytest.raises(_Stop) as stop:
        mem_hooks._around_configure(configure, kvc, pre_model_load_memory=0)
    assert stop.value.args == (FP8,) and kvc.kv_cache_dtype == FP8


@pytest.mark.parametrize("name, dtype", [("mxfp8", FP8), ("nvfp4", torch.uint8)])
def test_block_scaled_kv_caches_are_refused(name, dtype):
    with pytest.raises(pools.HelixPoolError, match="--kv-cache-dtype"):
        mem_hooks.check_kv_dtype(_FakeKvcDtype(None, dtype, name))
    for ok in (FP8, torch.float8_e5m2, torch.bfloat16):
        mem_hooks.check_kv_dtype(_FakeKvcDtype(None, ok, "fp8_e4m3"))
