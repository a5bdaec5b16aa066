"""Exchange backends: exact a2a data movement, a2a == ag_rs, byte counts, KVP=1, bad inputs.

One spawned 4-rank gloo group runs every multi-rank case (KVP=4 over the world, KVP=2 over two
pair subgroups); the parent rebuilds every rank's inputs from seeds and checks the results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sglang_helix.attention import merge_partials
from sglang_helix.comm import (
    HelixCommError,
    LocalExchange,
    a2a_bytes_per_rank,
    check_exchange_inputs,
    make_exchange,
)
from sglang_helix.ranks import run_ranks

WORLD = 4
# (kvp, dtype, B, Hl, Dv): small, but with B > 1, Hs > 1 and odd Dv so transposes show up.
CASES = [
    (4, torch.float32, 3, 8, 5),
    (4, torch.bfloat16, 2, 4, 7),
    (2, torch.float16, 3, 6, 4),
    (2, torch.bfloat16, 1, 2, 3),
    (2, torch.float32, 2, 4, 9),
]


def make_partial(case_id: int, src: int, tpa_group: int, dtype, bsz: int, heads: int, dv: int):
    """The partial (out [B, Hl, Dv], lse [B, Hl] fp32) that KVP rank `src` sends in a case.

    LSE holds the awkward values: -inf (empty shard), large, tiny and denormal fp32, whose bit
    patterns split into bf16/fp16 halves that are NaNs or denormals.
    """
    gen = torch.Generator().manual_seed(1000 * case_id + 10 * tpa_group + src)
    out = torch.randn(bsz, heads, dv, generator=gen).to(dtype)
    lse = torch.randn(bsz, heads, generator=gen) * 30
    specials = torch.tensor([float("-inf"), 3.4e38, 1e-40, -7.1e-39, 88.5, float("-inf")])
    flat = lse.view(-1)
    for i in range(min(flat.numel(), specials.numel())):
        flat[(i * 7 + src) % flat.numel()] = specials[i]
    # keep at least one finite LSE per (b, h) over sources so merges stay meaningful: source 0
    # never has -inf.
    if src == 0:
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return out, lse


def _group_of(rank: int, kvp: int, pair_groups, world_group):
    if kvp == WORLD:
        return world_group, rank, 0
    return pair_groups[rank // 2], rank % 2, rank // 2


def _comm_rank(rank: int, world_size: int):
    world_group = dist.new_group(list(range(world_size)))
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # same order on every rank
    results = []
    for cid, (kvp, dtype, bsz, heads, dv) in enumerate(CASES):
        group, kvp_rank, tpa_group = _group_of(rank, kvp, pair_groups, world_group)
        out, lse = make_partial(cid, kvp_rank, tpa_group, dtype, bsz, heads, dv)
        a2a = make_exchange("a2a", group, kvp)
        pending = a2a.start(out, lse)
        pending.wait()
        outs, lses = pending.partials()
        merged = pending.merge()
        agrs = make_exchange("ag_rs", group, kvp)
        merged_agrs = agrs(out, lse)
        results.append(dict(
            outs=outs.clone(), lses=lses.clone(), merged=merged, merged_agrs=merged_agrs,
            a2a_bytes=a2a.stats.bytes_sent, a2a_calls=a2a.stats.calls,
            agrs_bytes=agrs.stats.bytes_sent,
        ))
    errors = {}
    for name, thunk in [
        ("heads", lambda: make_exchange("a2a", pair_groups[rank // 2], 2)(
            torch.zeros(1, 3, 4), torch.zeros(1, 3))),
        ("group_size", lambda: make_exchange("a2a", world_group, 2)),
        ("nvshmem", lambda: make_exchange("nvshmem", pair_groups[rank // 2], 2)),
    ]:
        try:
            thunk()
            errors[name] = None
        except HelixCommError as exc:
            errors[name] = str(exc)
    return results, errors


@pytest.fixture(scope="module")
def comm_results():
    return run_ranks(_comm_rank, WORLD, timeout=240)


def _expected(cid: int, rank: int):
    kvp, dtype, bsz, heads, dv = CASES[cid]
    kvp_rank, tpa_group = (rank, 0) if kvp == WORLD else (rank % 2, rank // 2)
    hs = heads // kvp
    sl = slice(kvp_rank * hs, (kvp_rank + 1) * hs)
    parts = [make_partial(cid, src, tpa_group, dtype, bsz, heads, dv) for src in range(kvp)]
    outs = torch.stack([o[:, sl] for o, _ in parts])
    lses = torch.stack([lse[:, sl] for _, lse in parts])
    return outs, lses


@pytest.mark.multirank
@pytest.mark.parametrize("cid", range(len(CASES)))
def test_a2a_moves_partials_exactly(comm_results, cid):
    for rank in range(WORLD):
        got = comm_results[rank][0][cid]
        outs, lses = _expected(cid, rank)
        assert got["outs"].dtype == outs.dtype
        torch.testing.assert_close(got["outs"], outs, atol=0, rtol=0)
        # LSE bit-for-bit (including -inf, denormals, 3.4e38) through bf16/fp16 slots
        assert torch.equal(got["lses"].view(torch.int32), lses.view(torch.int32)), (cid, rank)
        expect = merge_partials(outs, lses)[0].to(outs.dtype)
        assert got["merged"].shape == (outs.shape[1], outs.shape[2], outs.shape[3])
        assert got["merged"].dtype == outs.dtype
        torch.testing.assert_close(got["merged"], expect, atol=0, rtol=0)


@pytest.mark.multirank
@pytest.mark.parametrize("cid", range(len(CASES)))
def test_ag_rs_matches_a2a(comm_results, cid):
    dtype = CASES[cid][1]
    # a2a merges partials already rounded to `dtype`; ag_rs rescales and sums in fp32, then
    # rounds once: they differ by ~ a couple of ulps of `dtype`.
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for rank in range(WORLD):
        got = comm_results[rank][0][cid]
        assert got["merged_agrs"].dtype == dtype
        assert not torch.isnan(got["merged_agrs"]).any()
        torch.testing.assert_close(got["merged_agrs"], got["merged"], **tol)


@pytest.mark.multirank
@pytest.mark.parametrize("cid", range(len(CASES)))
def test_bytes_sent_match_formulas(comm_results, cid):
    kvp, dtype, bsz, heads, dv = CASES[cid]
    item = torch.empty((), dtype=dtype).element_size()
    a2a = a2a_bytes_per_rank(bsz, heads, dv, item, kvp)
    assert a2a == bsz * heads * (dv * item + 4) * (kvp - 1) // kvp
    agrs = bsz * heads * 4 * (kvp - 1) + bsz * heads * dv * 4 * (kvp - 1) // kvp
    for rank in range(WORLD):
        got = comm_results[rank][0][cid]
        assert got["a2a_calls"] == 1
        assert got["a2a_bytes"] == a2a, (cid, rank, got["a2a_bytes"], a2a)
        assert got["agrs_bytes"] == agrs
        assert got["agrs_bytes"] > got["a2a_bytes"]


@pytest.mark.multirank
def test_multirank_errors(comm_results):
    for rank in range(WORLD):
        errors = comm_results[rank][1]
        assert "Hl=3" in errors["heads"] and "KVP=2" in errors["heads"]
        assert "4 ranks" in errors["group_size"]
        assert "comm_backend='nvshmem'" in errors["nvshmem"]


# ---- single process ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a2a", "ag_rs", "nvshmem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvp1_is_local_merge(name, dtype):
    ex = make_exchange(name, None, 1)
    assert isinstance(ex, LocalExchange)
    out = torch.randn(3, 4, 5).to(dtype)
    lse = torch.randn(3, 4)
    lse[1, 2] = float("-inf")  # empty shard: merge returns 0, not NaN
    got = ex(out, lse)
    assert got.shape == (3, 4, 5) and got.dtype == dtype
    expect = out.clone()
    expect[1, 2] = 0
    torch.testing.assert_close(got, expect, atol=0, rtol=0)
    pending = ex.start(out, lse)
    pending.wait()
    assert pending.merge().shape == (3, 4, 5)
    assert ex.stats.bytes_sent == 0 and ex.stats.calls == 2


@pytest.mark.parametrize(
    "out, lse, match",
    [
        (torch.zeros(2, 4), torch.zeros(2), r"\[B, Hl, Dv\]"),
        (torch.zeros(2, 4, 3), torch.zeros(2, 3), r"lse must be \[B, Hl\]"),
        (torch.zeros(2, 4, 3), torch.zeros(2, 4, dtype=torch.bfloat16), "fp32"),
        (torch.zeros(2, 4, 3, dtype=torch.int32), torch.zeros(2, 4), "floating"),
        (torch.zeros(2, 3, 4).transpose(1, 2), torch.zeros(2, 4), "contiguous"),
        (torch.zeros(2, 4, 3), torch.zeros(4, 2).t(), "contiguous"),
        (torch.zeros(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4), "cannot carry"),
    ],
)
def test_bad_inputs_raise(out, lse, match):
    with pytest.raises(HelixCommError, match=match):
        make_exchange("a2a", None, 1).start(out, lse)


def test_heads_not_divisible_by_kvp():
    with pytest.raises(HelixCommError, match="not divisible by KVP=4"):
        check_exchange_inputs(torch.zeros(1, 6, 2), torch.zeros(1, 6), 4)


def test_make_exchange_errors():
    with pytest.raises(HelixCommError, match="unknown"):
        make_exchange("nccl", None, 2)
    with pytest.raises(HelixCommError, match="process group"):
        make_exchange("a2a", None, 2)
    with pytest.raises(HelixCommError, match="kvp must be"):
        make_exchange("a2a", None, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nvshmem_on_cpu_names_the_flag():
    with pytest.raises(HelixCommError) as info:
        make_exchange("nvshmem", None, 2)
    msg = str(info.value)
    assert "comm_backend='nvshmem'" in msg and "--helix-comm-backend" in msg
    assert "'a2a'" in msg and "'ag_rs'" in msg
