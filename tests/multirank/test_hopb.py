"""HOP-B pipeline: schedule order, slices 1/2/3 identical, slices > B, empty batch, 2 ranks."""

from __future__ import annotations

import pytest
import torch

from sglang_helix.comm import LocalExchange, make_exchange
from sglang_helix.hopb import run_hopb, slice_bounds
from sglang_helix.ranks import run_ranks

B, HL, DV = 5, 4, 6
SLICES = (1, 2, 3, 7)  # 7 > B leaves empty slices


def partials(seed: int, dtype=torch.float32, bsz: int = B):
    """Whole-batch partials out [B, HL, DV], lse [B, HL] fp32 (one row with an empty shard)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(bsz, HL, DV, generator=gen).to(dtype)
    lse = torch.randn(bsz, HL, generator=gen) * 4
    if seed % 2:
        lse[min(1, bsz - 1)] = float("-inf")
        out[min(1, bsz - 1)] = 0
    return out, lse


def slicer(out, lse, calls=None):
    def fn(start, stop):
        if calls is not None:
            calls.append((start, stop))
        return out[start:stop].contiguous(), lse[start:stop].contiguous()

    return fn


class RecordingExchange(LocalExchange):
    """KVP=1 exchange that logs when slices start and merge (to check the overlap order)."""

    def __init__(self, log):
        super().__init__(None, 1)
        self.log = log

    def start(self, out, lse):
        self.log.append(("start", out.shape[0]))
        pending = super().start(out, lse)
        merge = pending.merge

        def logged_merge():
            self.log.append(("merge", out.shape[0]))
            return merge()

        pending.merge = logged_merge
        return pending


def test_schedule_overlaps_next_slice_with_exchange():
    log = []
    out, lse = partials(0, bsz=6)
    ex = RecordingExchange(log)

    def fn(start, stop):
        log.append(("compute", stop - start))
        return out[start:stop].contiguous(), lse[start:stop].contiguous()

    run_hopb(fn, ex, 6, [(0, 1), (1, 3), (3, 6)])
    assert log == [
        ("compute", 1), ("start", 1),
        ("compute", 2), ("start", 2), ("merge", 1),
        ("compute", 3), ("start", 3), ("merge", 2),
        ("merge", 3),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slices_identical_local(dtype):
    out, lse = partials(3, dtype)
    base = run_hopb(slicer(out, lse), make_exchange("a2a", None, 1), B, 1)
    assert base.shape == (B, HL, DV) and base.dtype == dtype
    for slices in SLICES[1:]:
        calls = []
        got = run_hopb(slicer(out, lse, calls), make_exchange("a2a", None, 1), B, slices)
        assert torch.equal(got, base), slices
        assert len(calls) == min(slices, B)  # empty slices never reach partial_fn / the wire
        assert [c for c in calls] == slice_bounds(B, slices)


def test_empty_batch():
    out, lse = partials(0, bsz=0)
    got = run_hopb(slicer(out, lse), make_exchange("a2a", None, 1), 0, 3)
    assert got.shape == (0, HL, DV)


def test_slice_bounds():
    assert slice_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert slice_bounds(2, 4) == [(0, 1), (1, 2)]
    assert slice_bounds(4, [(0, 0), (0, 4)]) == [(0, 4)]
    with pytest.raises(ValueError, match="tile"):
        slice_bounds(4, [(0, 2), (3, 4)])
    with pytest.raises(ValueError, match="cover"):
        slice_bounds(4, [(0, 2)])


# ---- 2 ranks: several exchanges in flight at once over gloo -----------------------------------


def _hopb_rank(rank: int, world: int):
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    res = {}
    for backend in ("a2a", "ag_rs"):
        for dtype in (torch.float32, torch.bfloat16):
            out, lse = partials(10 + rank, dtype)
            for slices in SLICES:
                ex = make_exchange(backend, group, world)
                res[backend, dtype, slices] = (run_hopb(slicer(out, lse), ex, B, slices),
                                               ex.stats.bytes_sent, ex.stats.calls)
    return res


@pytest.fixture(scope="module")
def hopb_results():
    return run_ranks(_hopb_rank, 2, timeout=180)


@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["a2a", "ag_rs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slices_identical_multirank(hopb_results, backend, dtype):
    for rank in range(2):
        base, base_bytes, _ = hopb_results[rank][backend, dtype, 1]
        assert base.shape == (B, HL // 2, DV)
        # rank r owns head slice r merged over both ranks' partials
        hs = slice(rank * HL // 2, (rank + 1) * HL // 2)
        parts = [partials(10 + r, dtype) for r in range(2)]
        expect = _merge_fp32([o[:, hs] for o, _ in parts], [lse[:, hs] for _, lse in parts])
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(base.float(), expect, **tol)
        for slices in SLICES[1:]:
            got, nbytes, calls = hopb_results[rank][backend, dtype, slices]
            assert calls == min(slices, B) and nbytes == base_bytes
            if backend == "a2a":
                assert torch.equal(got, base), (rank, slices)
            else:  # ag_rs reduce-scatter order may differ per slice size: fp tolerance
                torch.testing.assert_close(got, base, **tol)


def _merge_fp32(outs, lses):
    lses = torch.stack(lses)
    w = torch.softmax(torch.where(torch.isinf(lses), -1e30, lses), dim=0)
    return (w.unsqueeze(-1) * torch.stack(outs).float()).sum(0)
