"""helix_extend (prefill over a KV-sharded cached prefix) on 2 gloo ranks vs dense attention.

Each rank holds only its pages of every request's prefix (ragged; one prefix ends mid-page, one
is shorter than a page so rank 1 owns nothing of it, one request has no prefix), computes the
chunk's causal attention for its own heads and the prefix partial for all heads, and one real
exchange (a2a or ag_rs) merges them. Rank d's [T, H/KVP, Dv] must equal dense causal attention
over prefix + chunk for heads [d*H/KVP, (d+1)*H/KVP).
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix.kernels.reference import attention_lse_ref
from sglang_helix.ranks import run_ranks

KVP, PAGE, D, DV = 2, 4, 6, 5
PREFIX, CHUNK = [0, 3, 9, 16], [3, 2, 5, 1]


def _inputs(hq: int, hk: int):
    g = torch.Generator().manual_seed(hq * 7 + hk)
    full = [p + c for p, c in zip(PREFIX, CHUNK)]
    k = [torch.randn(n, hk, D, generator=g) for n in full]
    v = [torch.randn(n, hk, DV, generator=g) for n in full]
    q = torch.randn(sum(CHUNK), hq, D, generator=g)
    return q, k, v


def _rank(rank: int, world: int, hq: int, hk: int, backend: str, dtype=torch.float32,
          partial_dtype=torch.float32, with_bytes=False):
    import torch.distributed as dist

    from sglang_helix.comm import make_exchange
    from sglang_helix.dev.paged import build_local_paged_cache
    from sglang_helix.extend import helix_extend
    from sglang_helix.metadata import plan_extend

    q, k, v = (x.to(dtype) if torch.is_tensor(x) else [t.to(dtype) for t in x] for x in _inputs(hq, hk))
    seqs = [torch.cat([k[i][:p], v[i][:p]], -1) if p else torch.zeros(1, hk, D + DV, dtype=dtype)
            for i, p in enumerate(PREFIX)]
    cache, table = build_local_paged_cache(seqs, PAGE, KVP, rank)
    plan = plan_extend(CHUNK, PREFIX, rank, PAGE, KVP, local_tables=lambda _: (table, None))
    k_new = torch.cat([k[i][p:] for i, p in enumerate(PREFIX)])
    v_new = torch.cat([v[i][p:] for i, p in enumerate(PREFIX)])
    exchange = make_exchange(backend, dist.group.WORLD, KVP)
    out = helix_extend(q, k_new, v_new, plan, cache[..., :D], cache[..., D:], 0.35, kvp_rank=rank,
                       heads_per_rank=hq // KVP, exchange=exchange, partial_dtype=partial_dtype)
    return (out, exchange.stats.bytes_sent) if with_bytes else out


@pytest.mark.multirank
@pytest.mark.parametrize("hq, hk", [(4, 2), (4, 1), (2, 2)], ids=["gqa", "mla-like", "mha"])
@pytest.mark.parametrize("backend", ["a2a", "ag_rs"])
def test_helix_extend_equals_dense(hq, hk, backend):
    outs = run_ranks(_rank, KVP, args=(hq, hk, backend), timeout=120)
    q, k, v = _inputs(hq, hk)
    got = torch.cat(outs, dim=1)  # [T, H, Dv]: rank d holds head slice d
    start = 0
    for i, (p, c) in enumerate(zip(PREFIX, CHUNK)):
        want, _ = attention_lse_ref(q[start:start + c], k[i], v[i], 0.35, causal_offset=p)
        torch.testing.assert_close(got[start:start + c], want, atol=2e-5, rtol=2e-5)
        start += c


@pytest.mark.multirank
@pytest.mark.parametrize("sent", [torch.float32, torch.bfloat16], ids=["fp32", "activation"])
def test_helix_extend_bf16_exchange_dtypes(sent):
    """bf16 model, partials exchanged in fp32 (default) or bf16 (--helix-exchange-dtype
    activation): bf16 output within bf16 rounding of fp32 dense attention on the same bf16
    values; a2a bytes = T x Hq x (Dv x itemsize + 4) / 2 at KVP 2, i.e. the dtype on the wire."""
    hq, hk = 4, 2
    outs = run_ranks(_rank, KVP, args=(hq, hk, "a2a", torch.bfloat16, sent, True), timeout=120)
    q, k, v = _inputs(hq, hk)
    q, k, v = q.bfloat16().float(), [t.bfloat16().float() for t in k], [t.bfloat16().float() for t in v]
    got = torch.cat([o for o, _ in outs], dim=1)
    assert got.dtype == torch.bfloat16
    start = 0
    for i, (p, c) in enumerate(zip(PREFIX, CHUNK)):
        want, _ = attention_lse_ref(q[start:start + c], k[i], v[i], 0.35, causal_offset=p)
        torch.testing.assert_close(got[start:start + c].float(), want, atol=1.6e-2, rtol=1.6e-2)
        start += c
    itemsize = torch.empty((), dtype=sent).element_size()
    assert [b for _, b in outs] == [sum(CHUNK) * hq * (DV * itemsize + 4) // 2] * KVP
