"""Helix decode is CUDA-graph-safe, shown on CPU ranks (GQA and MLA, KVP 2 over gloo, HOP-B 1, 2).

- The run path (partial attention, exchange, merge, HOP-B slicing) of whole decode steps runs
  under dev.syncs.no_host_sync(): no host read of a tensor value, no data-dependent shape, no
  device-to-host copy. Only plan() may sync, and it runs outside the guard, as it runs outside
  the graph in SGLang.
- A step planned again at a larger, padded batch (the graph's batch size; padded rows get
  seq_len 1, as the backend's fill value) into the same preallocated buffers gives the real rows'
  outputs bit for bit, and the buffers never move (a captured graph keeps reading them).
The kernels here are the CPU torch ones fed the plan's host lengths; Triton launches a static
grid (page_table's width) and is captured for real by scripts/gpu_check.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix.ranks import run_ranks

LENS = [13, 1, 9]
PAD_LEN = 1  # srt.backends.base.GRAPH_SEQ_LEN_FILL
PAGE, KVP, H = 4, 2, 4


def _case(mla: bool):
    g = torch.Generator().manual_seed(11 if mla else 12)
    kh, d, dv = (1, 12, 8) if mla else (2, 8, 6)
    seqs = [torch.randn(n, kh, d + (0 if mla else dv), generator=g) for n in LENS + [PAD_LEN]]
    if mla:
        seqs = [s[:, 0] for s in seqs]  # [L, R + Dr]: one latent head
    q = torch.randn(len(LENS) + 1, H, d, generator=g)
    return seqs, q, d, dv


def _rank(rank: int, world: int, mla: bool, hopb: int):
    import torch.distributed as dist

    from sglang_helix.config import HelixConfig
    from sglang_helix.decode import HelixAttention
    from sglang_helix.dev.paged import build_local_paged_cache
    from sglang_helix.dev.syncs import no_host_sync

    seqs, q, d, dv = _case(mla)
    cfg = HelixConfig(kvp=KVP, tpa=1, num_heads=H, num_kv_heads=1 if mla else 2, mla=mla,
                      page_size=PAGE, hopb_slices=hopb)
    helix = HelixAttention(cfg, rank, dist.group.WORLD, max_batch=6, max_local_pages=4, kernels="torch")
    cache, table = build_local_paged_cache(seqs, PAGE, KVP, rank)
    buffers = (helix.meta.seq_lens_buf.data_ptr(), helix.meta.page_table_buf.data_ptr())

    def step(rows: int):
        lens = torch.tensor((LENS + [PAD_LEN])[:rows])
        helix.plan(lens, table[:rows])  # outside the guard, as outside the graph
        with no_host_sync():
            if mla:
                return helix.forward_mla(q[:rows, :, :8], q[:rows, :, 8:], cache, 0.3)
            return helix.forward_gqa(q[:rows], cache[..., :d], cache[..., d:], 0.3)

    eager = step(len(LENS))
    padded = step(len(LENS) + 1)
    again = step(len(LENS))
    moved = buffers != (helix.meta.seq_lens_buf.data_ptr(), helix.meta.page_table_buf.data_ptr())
    return eager, padded, again, moved


@pytest.mark.multirank
@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
@pytest.mark.parametrize("hopb", [1, 2])
def test_decode_step_sync_free_and_padding_exact(mla, hopb):
    results = run_ranks(_rank, KVP, args=(mla, hopb), timeout=120)
    for eager, padded, again, moved in results:
        assert not moved
        assert padded.shape[0] == len(LENS) + 1 and torch.isfinite(padded).all()
        torch.testing.assert_close(padded[: len(LENS)], eager, atol=0, rtol=0)
        torch.testing.assert_close(again, eager, atol=0, rtol=0)


def test_guard_catches_what_a_graph_cannot_hold():
    from sglang_helix.dev.syncs import HostSyncError, no_host_sync

    x = torch.arange(6)
    for fn in (lambda: x.tolist(), lambda: int(x[0]), lambda: x.nonzero(), lambda: x[x > 2],
               lambda: x.max().item(), lambda: bool(x[1])):
        with pytest.raises(HostSyncError), no_host_sync():
            fn()
    with no_host_sync():
        torch.where(x > 2, x, 0).sum()  # static shapes, no host read: allowed
    assert x.tolist() == list(range(6))  # patched methods restored
