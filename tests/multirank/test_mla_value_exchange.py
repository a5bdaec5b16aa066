"""MLA value exchange (W_UV before the exchange) on 2 gloo ranks == latent exchange then W_UV.

One spawn runs every case. Decode: HelixAttention with mla_exchange "value" (W_UV of all H heads
applied to each rank's partial) vs "latent" followed by W_UV of the rank's own H/N heads, HOP-B
1 and 2, a2a and ag_rs, fp32; both also vs dense attention + W_UV. Extend: helix_extend with
w_uv over a KV-sharded cached prefix (one prefix ends mid-page, one is shorter than a page, one
request has none) vs helix_extend then W_UV. Bytes: the exchange stats (comm.ExchangeStats) of
both modes at DeepSeek-V3 dims (H 128, R 512, Dr 64, Dv 128), bf16, batch 1, KVP 2.
"""

from __future__ import annotations

import pytest
import torch

from sglang_helix.attention import project_values
from sglang_helix.comm import a2a_bytes_per_rank
from sglang_helix.config import HelixConfig, HelixConfigError
from sglang_helix.kernels.reference import attention_lse_ref, full_attention_ref
from sglang_helix.ranks import run_ranks

KVP, H, R, DR, DV, PAGE = 2, 8, 48, 8, 16, 4
SCALE = (R + DR) ** -0.5
SEQS = [5, 16, 17, 40, 3]
PREFIX, CHUNK = [0, 3, 9, 16], [3, 2, 5, 1]
DSV3 = dict(h=128, r=512, dr=64, dv=128, seq=96)
FP32 = dict(atol=1e-5, rtol=1e-5)
DECODE_CASES = [(s, b) for s in (1, 2) for b in ("a2a", "ag_rs")]


def w_uv_of(h: int, r: int, dv: int, dtype=torch.float32, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(h, r, dv, generator=g) * r ** -0.5).to(dtype)


def decode_inputs(h=H, r=R, dr=DR, seqs=SEQS, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return rnd(len(seqs), h, r), rnd(len(seqs), h, dr), [rnd(n, r + dr) for n in seqs]


def _decode(rank, group, mode, slices, backend, h=H, r=R, dr=DR, dv=DV, seqs=SEQS,
            dtype=torch.float32):
    from sglang_helix.decode import HelixAttention
    from sglang_helix.dev.paged import build_local_paged_cache

    cfg = HelixConfig(kvp=KVP, num_heads=h, mla=True, page_size=PAGE, comm_backend=backend,
                      hopb_slices=slices, mla_exchange=mode)
    q_lat, q_rope, kv = decode_inputs(h, r, dr, seqs, dtype)
    cache, table = build_local_paged_cache(kv, PAGE, KVP, rank, seed=5)
    helix = HelixAttention(cfg, rank, group, max_batch=len(seqs), max_local_pages=table.shape[1])
    helix.plan(torch.tensor(seqs), table)
    w_uv = w_uv_of(h, r, dv, dtype) if mode == "value" else None
    out = helix.forward_mla(q_lat, q_rope, cache, (r + dr) ** -0.5, w_uv=w_uv)
    return out, helix.exchange.stats.bytes_sent


def _extend(rank, group, w_uv):
    from sglang_helix.comm import make_exchange
    from sglang_helix.dev.paged import build_local_paged_cache
    from sglang_helix.extend import helix_extend
    from sglang_helix.metadata import plan_extend

    q, kv = extend_inputs()
    seqs = [kv[i][:p] if p else torch.zeros(1, R + DR) for i, p in enumerate(PREFIX)]
    cache, table = build_local_paged_cache(seqs, PAGE, KVP, rank)
    plan = plan_extend(CHUNK, PREFIX, rank, PAGE, KVP, local_tables=lambda _: (table, None))
    new = torch.cat([kv[i][p:] for i, p in enumerate(PREFIX)])[:, None]
    pages = cache.unsqueeze(2)
    return helix_extend(q, new, new[..., :R], plan, pages, pages[..., :R], SCALE, kvp_rank=rank,
                        heads_per_rank=H // KVP, exchange=make_exchange("a2a", group, KVP),
                        w_uv=w_uv)


def extend_inputs():
    g = torch.Generator().manual_seed(9)
    full = [p + c for p, c in zip(PREFIX, CHUNK)]
    return torch.randn(sum(CHUNK), H, R + DR, generator=g), [torch.randn(n, R + DR, generator=g)
                                                             for n in full]


def _rank(rank: int, world: int):
    import torch.distributed as dist

    group = dist.group.WORLD
    res = {"decode": {}}
    for slices, backend in DECODE_CASES:
        for mode in ("latent", "value"):
            res["decode"][(mode, slices, backend)] = _decode(rank, group, mode, slices, backend)
    res["extend"] = {"latent": _extend(rank, group, None),
                     "value": _extend(rank, group, w_uv_of(H, R, DV))}
    d = DSV3
    res["bytes"] = {mode: _decode(rank, group, mode, 1, "a2a", d["h"], d["r"], d["dr"], d["dv"],
                                  [d["seq"]], torch.bfloat16)[1] for mode in ("latent", "value")}
    return res


_RESULTS: list = []


def results():
    if not _RESULTS:
        _RESULTS.append(run_ranks(_rank, KVP, timeout=300))
    return _RESULTS[0]


def own(rank: int, h: int = H) -> slice:
    return slice(rank * h // KVP, (rank + 1) * h // KVP)


def dense_decode_values() -> torch.Tensor:
    """Full attention over each whole sequence, then W_UV: [B, H, Dv] fp32."""
    q_lat, q_rope, kv = decode_inputs()
    outs = []
    for b, seq in enumerate(kv):
        q = torch.cat([q_lat[b], q_rope[b]], -1)
        k = seq.unsqueeze(1).expand(-1, H, -1)
        outs.append(full_attention_ref(q, k, k[..., :R], SCALE)[0])
    return project_values(torch.stack(outs), w_uv_of(H, R, DV))


@pytest.mark.multirank
@pytest.mark.parametrize("slices, backend", DECODE_CASES)
def test_decode_value_exchange_equals_latent_then_w_uv(slices, backend):
    per_rank, w_uv = results(), w_uv_of(H, R, DV)
    dense = dense_decode_values()
    for rank in range(KVP):
        latent, _ = per_rank[rank]["decode"][("latent", slices, backend)]
        value, _ = per_rank[rank]["decode"][("value", slices, backend)]
        assert latent.shape == (len(SEQS), H // KVP, R) and value.shape == (len(SEQS), H // KVP, DV)
        torch.testing.assert_close(value, project_values(latent, w_uv[own(rank)]), **FP32)
        torch.testing.assert_close(value, dense[:, own(rank)], **FP32)


@pytest.mark.multirank
def test_decode_value_exchange_hopb_matches_unsliced():
    per_rank = results()
    for rank in range(KVP):
        for backend in ("a2a", "ag_rs"):
            one = per_rank[rank]["decode"][("value", 1, backend)][0]
            two = per_rank[rank]["decode"][("value", 2, backend)][0]
            torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)


@pytest.mark.multirank
def test_extend_value_exchange_equals_latent_then_w_uv():
    per_rank, w_uv = results(), w_uv_of(H, R, DV)
    q, kv = extend_inputs()
    for rank in range(KVP):
        latent, value = per_rank[rank]["extend"]["latent"], per_rank[rank]["extend"]["value"]
        assert value.shape == (sum(CHUNK), H // KVP, DV)
        torch.testing.assert_close(value, project_values(latent, w_uv[own(rank)]), **FP32)
    got = torch.cat([per_rank[r]["extend"]["value"] for r in range(KVP)], dim=1)
    start = 0
    for i, (p, c) in enumerate(zip(PREFIX, CHUNK)):  # vs dense causal attention, then W_UV
        k = kv[i][:, None].expand(-1, H, -1)
        want, _ = attention_lse_ref(q[start:start + c], k, k[..., :R], SCALE, causal_offset=p)
        torch.testing.assert_close(got[start:start + c], project_values(want, w_uv), **FP32)
        start += c


@pytest.mark.multirank
def test_value_exchange_bytes_at_deepseek_v3_dims():
    """bf16 activations, batch 1, KVP 2; partials travel in fp32 (docs/math.md section 4): the
    latent a2a sends 128 x (512 x 4 + 4) / 2 = 131,328 bytes per rank per step, the value a2a
    128 x (128 x 4 + 4) / 2 = 33,024: 3.98x fewer."""
    d = DSV3
    for rank_bytes in results():
        latent, value = rank_bytes["bytes"]["latent"], rank_bytes["bytes"]["value"]
        assert latent == a2a_bytes_per_rank(1, d["h"], d["r"], 4, KVP) == 131_328
        assert value == a2a_bytes_per_rank(1, d["h"], d["dv"], 4, KVP) == 33_024
        assert latent / value == pytest.approx((512 * 4 + 4) / (128 * 4 + 4))


def test_forward_mla_checks_w_uv_against_the_config():
    from sglang_helix.decode import HelixAttention

    q_lat, q_rope, kv = decode_inputs(seqs=[3])
    for mode, w_uv, match in (("value", None, "needs w_uv"), ("latent", w_uv_of(H, R, DV), "takes no")):
        cfg = HelixConfig(kvp=1, num_heads=H, mla=True, page_size=PAGE, mla_exchange=mode)
        helix = HelixAttention(cfg, 0, None, max_batch=1, max_local_pages=1)
        helix.plan(torch.tensor([3]), torch.zeros(1, 1, dtype=torch.int32))
        with pytest.raises(HelixConfigError, match=match):
            helix.forward_mla(q_lat, q_rope, torch.zeros(1, PAGE, R + DR), SCALE, w_uv=w_uv)
    with pytest.raises(ValueError, match=r"w_uv must be \[H, R, Dv\]"):
        project_values(q_lat, w_uv_of(H, R + 1, DV))
