"""Helix MLA glue (sglang_helix.srt.models.deepseek) against fp32 references; multi-rank parts on gloo.

- weights: replicated q projection + W_UK gathered for all heads; W_UV / o_proj per-rank slices;
  the whole layer (projection, absorption, attention, W_UV, row-parallel o_proj summed over
  ranks) equals an independent non-absorbed MLA layer.
- math: chunk-causal attention, extend with a cached prefix (page-aligned and not), decode —
  through the real HelixMLABackend over real HelixMLATokenToKVPools on 2 gloo ranks,
  vs dense fp32 attention over the whole sequence.
- hooks: pass-through with Helix off, the CPU absorbed-MLA workaround (routes torch_native to
  MLA); where they are installed and that they apply: tests/srt/test_hook_table.py.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub as sgl_kernel_cpu_stub

    sgl_kernel_cpu_stub.install()
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
        AttnForwardMethod,
    )

    from sglang_helix.srt.backends.mla import HelixMLABackend
    from sglang_helix.srt.cpu import mla_fix
    from sglang_helix.srt.memory.pools import HelixMLATokenToKVPool, HelixPoolError
    from sglang_helix.srt.models import deepseek as sm

from sglang_helix.attention import chunk_attention_lse
from sglang_helix.config import HelixConfig, HelixConfigError
from sglang_helix.extend import helix_extend
from sglang_helix.metadata import plan_extend
from sglang_helix.ranks import run_ranks

H, N, DN, DR, R, DV, HID = 4, 2, 6, 4, 16, 6, 12
P = 4
SCALE = (DN + DR) ** -0.5


def extend_no_prefix(q, kv, lens, kvp_rank, exchange=None, w_uv=None):
    """Core helix_extend for a batch without cached prefix: q [T, H, R+Dr], kv [T, R+Dr]."""
    plan = plan_extend(lens, [0] * len(lens), kvp_rank, P, N)
    return helix_extend(q, kv[:, None], kv[:, None, :R], plan, None, None, SCALE, kvp_rank=kvp_rank,
                        heads_per_rank=H // N, exchange=exchange, w_uv=w_uv)


def dense_latent_attention(q, kv, scale, rank_r):
    """q [H, R+Dr] one query; kv [L, R+Dr] its visible tokens -> [H, R] fp32 (the ground truth)."""
    scores = q.double() @ kv.double().T * scale
    return (torch.softmax(scores, -1) @ kv[:, :rank_r].double()).float()


# ----------------------------------------------------------------------------- layer weights


def full_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return SimpleNamespace(wq=rnd(H * (DN + DR), HID), wkva=rnd(R + DR, HID),
                           kvb=rnd(H * (DN + DV), R), wo=rnd(HID, H * DV))


def rank_module(w, g):
    """What SGLang builds on attention-TP rank g of N: H/N-head slices of q, kv_b (w_kc, w_vc), o."""
    heads = slice(g * H // N, (g + 1) * H // N)
    kvb = w.kvb.view(H, DN + DV, R)
    q_rows = w.wq.view(H, DN + DR, HID)[heads].reshape(-1, HID)
    cols = w.wo.view(HID, H, DV)[:, heads].reshape(HID, -1)
    return SimpleNamespace(
        layer_id=0, num_heads=H, num_local_heads=H // N, qk_nope_head_dim=DN, qk_rope_head_dim=DR,
        qk_head_dim=DN + DR, kv_lora_rank=R, v_head_dim=DV, q_lora_rank=None, use_dsa=False,
        use_deep_gemm_bmm=False, q_proj=SimpleNamespace(weight=torch.nn.Parameter(q_rows)),
        w_kc=kvb[heads, :DN].contiguous(), w_vc=kvb[heads, DN:].transpose(1, 2).contiguous(),
        kv_a_proj_with_mqa=lambda x: (x @ w.wkva.T, None),
        kv_a_layernorm=lambda t: t * 2.0,  # any per-token map; the reference applies the same
        rotary_emb=None, o_proj=lambda x: (x @ cols.T, None), next_skip_topk=None,
        attn_mqa=SimpleNamespace(layer_id=0, scaling=SCALE))


def gather_over(modules):
    """gather(t) as replicate_q_weights expects: concat of every rank's same tensor, rank order."""
    def gather(t):
        for name in ("q_proj", "w_kc", "w_vc"):
            mine = [m.q_proj.weight.data if name == "q_proj" else getattr(m, name) for m in modules]
            if any(x.shape == t.shape and torch.equal(x, t) for x in mine):
                return torch.cat(mine)
        raise AssertionError("unknown tensor")
    return gather


def reference_layer(w, x):
    """Non-absorbed MLA (decompress k/v per head), causal, fp64: [T, HID]."""
    x = x.double()
    q = (x @ w.wq.double().T).view(-1, H, DN + DR)
    lat = x @ w.wkva.double().T
    c, k_pe = lat[:, :R] * 2.0, lat[:, R:]
    kvb = w.kvb.double().view(H, DN + DV, R)
    k_nope = torch.einsum("tr,hdr->thd", c, kvb[:, :DN])
    v = torch.einsum("tr,hdr->thd", c, kvb[:, DN:])
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, H, -1)], -1)
    scores = torch.einsum("thd,shd->hts", q, k) * SCALE
    t = x.shape[0]
    scores.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, -1), v).reshape(t, -1)
    return (out @ w.wo.double().T).float()


def test_replicated_q_weights_are_the_full_tensors():
    w = full_weights()
    mods = [rank_module(w, g) for g in range(N)]
    for m in mods:
        sm.replicate_q_weights(m, gather_over(mods))
        assert torch.equal(m.helix_q_weight, w.wq)
        assert torch.equal(m.helix_w_kc, w.kvb.view(H, DN + DV, R)[:, :DN])
        assert m.w_vc.shape == (H // N, R, DV)  # W_UV stays this rank's slice
        assert getattr(m, "helix_w_vc", None) is None
        sm.replicate_w_uv(m, gather_over(mods))  # --helix-mla-exchange value: all heads
        assert torch.equal(m.helix_w_vc, w.kvb.view(H, DN + DV, R)[:, DN:].transpose(1, 2))


def test_replicate_refuses_unsupported_weights_and_wrong_group():
    w = full_weights()
    mods = [rank_module(w, g) for g in range(N)]
    mods[0].w_kc = mods[0].w_kc.to(torch.float8_e4m3fn)  # fp8 without SGLang's w_scale
    with pytest.raises(sm.HelixMLAError, match="without a per-tensor w_scale.*fp8 \\(e4m3\\)"):
        sm.replicate_q_weights(mods[0], lambda t: t)
    mods[0].w_kc, mods[0].use_deep_gemm_bmm = mods[1].w_kc, True
    with pytest.raises(sm.HelixMLAError, match="SGLANG_USE_DEEPGEMM_BMM"):
        sm.replicate_q_weights(mods[0], lambda t: t)
    mods[0].use_deep_gemm_bmm = False
    mods[0].q_proj.quant_method = type("AWQLinearMethod", (), {})()
    with pytest.raises(sm.HelixMLAError, match="quantized with AWQLinearMethod"):
        sm.replicate_q_weights(mods[0], lambda t: t)
    mods[0].q_proj.quant_method = type("ModelOptFp4LinearMethod", (), {})()  # NVFP4 MLA projections
    mods[0].w_kc = torch.zeros(mods[1].w_kc.shape, dtype=torch.uint8)  # SGLang splits the packed bytes
    with pytest.raises(sm.HelixMLAError, match=r"quantized W_UK/W_UV \(torch.uint8\).*"
                                               r"ModelOptFp4LinearMethod.*NVFP4 \(MLA projections"):
        sm.replicate_q_weights(mods[0], lambda t: t)
    mods[0].w_kc = mods[1].w_kc
    with pytest.raises(sm.HelixMLAError, match="--tp-size"):
        sm.replicate_q_weights(mods[1], lambda t: t)  # a 1-rank "group": only H/N heads


def test_fp8_w_uk_w_uv_are_replicated_as_sglang_cpu_applies_them():
    """SGLang turns a block-fp8 kv_b_proj into per-rank fp8 w_kc / w_vc + a per-tensor w_scale;
    Helix gathers `w.to(bf16) * w_scale` of every rank (each with its own scale), the same tensor
    SGLang's CPU branch multiplies, and the absorbed bmm then runs in bf16 like SGLang's."""
    w = full_weights()
    mods = [rank_module(w, g) for g in range(N)]
    expected_kc, expected_vc = [], []
    for g, m in enumerate(mods):
        scale = torch.tensor(0.01 * (g + 1))
        m.w_kc, m.w_vc = (m.w_kc / scale).to(torch.float8_e4m3fn), (m.w_vc / scale).to(torch.float8_e4m3fn)
        m.w_scale = scale
        expected_kc.append(m.w_kc.to(torch.bfloat16) * scale)
        expected_vc.append(m.w_vc.to(torch.bfloat16) * scale)
    gather = lambda t: torch.cat([  # noqa: E731
        *(x for x in (expected_kc if any(torch.equal(t, e) for e in expected_kc) else
                      expected_vc if any(torch.equal(t, e) for e in expected_vc) else
                      [m.q_proj.weight.data for m in mods]))])
    for m in mods:
        sm.replicate_q_weights(m, gather)
        sm.replicate_w_uv(m, gather)
        assert m.helix_w_kc.dtype == torch.bfloat16
        torch.testing.assert_close(m.helix_w_kc, torch.cat(expected_kc), atol=0, rtol=0)
        torch.testing.assert_close(m.helix_w_vc, torch.cat(expected_vc), atol=0, rtol=0)
        assert m.w_kc.dtype == torch.float8_e4m3fn  # SGLang's own tensors are left as they are


class CoreBackend:
    """Stands in for HelixMLABackend in helix_absorb_core: core helix_extend on rank g (no
    prefix), passing on the w_uv the model path hands over; records the output width."""

    def __init__(self, g):
        self.g, self.widths = g, []

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = extend_no_prefix(q, k[:, 0], [q.shape[0]], self.g, w_uv=kwargs.get("w_uv"))
        self.widths.append(out.shape[-1])
        return out.reshape(out.shape[0], -1)


@pytest.mark.parametrize("mode", ["latent", "value"])
def test_layer_sharded_equals_non_absorbed_mla(mode, monkeypatch):
    """prepare (all-head q, absorption, latent) -> core (per-rank heads attention; W_UV after the
    exchange for "latent", before it for "value") -> o_proj partials summed over ranks (what
    o_proj's all-reduce does) == the plain MLA layer."""
    from sglang_helix.srt import state

    cfg = HelixConfig(**{**CFG, "mla_exchange": mode})
    monkeypatch.setattr(state, "current_config", lambda: cfg)
    w = full_weights(1)
    x = torch.randn(7, HID, generator=torch.Generator().manual_seed(2))
    mods = [rank_module(w, g) for g in range(N)]
    total = torch.zeros(7, HID)
    for g, m in enumerate(mods):
        sm.replicate_q_weights(m, gather_over(mods))
        if mode == "value":
            sm.replicate_w_uv(m, gather_over(mods))
        q_pe, k_pe, q_nope_out, k_nope, *rest = sm.helix_absorb_prepare(
            m, torch.arange(7), x, None, None)
        assert q_nope_out.shape == (7, H, R) and q_pe.shape == (7, H, DR)
        assert k_nope.shape == (7, 1, R) and k_pe.shape == (7, 1, DR)
        backend = CoreBackend(g)
        monkeypatch.setattr(sm, "find_helix_mla_backend", lambda: backend)
        total += sm.helix_absorb_core(m, q_pe, k_pe, q_nope_out, k_nope, *rest)
        assert backend.widths == [DV if mode == "value" else R]
    torch.testing.assert_close(total, reference_layer(w, x), rtol=1e-4, atol=1e-5)


def test_value_core_refuses_without_replicated_w_uv(monkeypatch):
    from sglang_helix.srt import state

    cfg = HelixConfig(**{**CFG, "mla_exchange": "value"})
    monkeypatch.setattr(state, "current_config", lambda: cfg)
    m = rank_module(full_weights(), 0)
    monkeypatch.setattr(sm, "find_helix_mla_backend", lambda: CoreBackend(0))
    with pytest.raises(sm.HelixMLAError, match="no replicated W_UV"):
        sm.helix_absorb_core(m, *[None] * 9)


def test_helix_prepare_refuses_without_replicated_weights():
    m = rank_module(full_weights(), 0)
    with pytest.raises(sm.HelixMLAError, match="post-load hook"):
        sm.helix_absorb_prepare(m, torch.arange(2), torch.zeros(2, HID), None, None)


# ----------------------------------------------------------------------------- attention math


def test_chunk_causal_matches_dense():
    g = torch.Generator().manual_seed(3)
    lens = [5, 1, 3]
    q = torch.randn(9, 3, R + DR, generator=g)
    kv = torch.randn(9, R + DR, generator=g)
    out, lse = chunk_attention_lse(q, kv[:, None], kv[:, None, :R], lens, 0.3)
    assert out.shape == (9, 3, R) and lse.shape == (9, 3)
    start = 0
    for n in lens:
        for i in range(n):
            t = start + i
            want = dense_latent_attention(q[t], kv[start:t + 1], 0.3, R)
            torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)
            scores = q[t].double() @ kv[start:t + 1].double().T * 0.3
            torch.testing.assert_close(lse[t].double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
        start += n


def test_extend_without_prefix_needs_no_exchange():
    q = torch.randn(4, H, R + DR)
    kv = torch.randn(4, R + DR)

    def boom(*_):
        raise AssertionError("no prefix: nothing to exchange")

    out = extend_no_prefix(q, kv, [4], 1, exchange=boom)
    want, _ = chunk_attention_lse(q[:, H // N:], kv[:, None], kv[:, None, :R], [4], SCALE)
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------- backend on ranks

CFG = dict(kvp=N, tpa=1, num_heads=H, num_kv_heads=1, mla=True, page_size=P)
LENS = (16, 12)          # two requests
CHUNK1 = (6, 4)          # first prefill chunk (no prefix)
CHUNK2_END = (10, 6)     # second chunk [CHUNK1, CHUNK2_END): prefix 6 (not page-aligned) and 4
DECODE_STEPS = 3         # positions CHUNK2_END .. +2: crosses page boundaries (12 and 8)
DRAFTS = 3               # then a speculative TARGET_VERIFY of 3 chain drafts: positions 13..15, 9..11
CTX = 32


def loc_of(req, pos):
    """Logical loc of a token: page id colored j % KVP (as HelixPagedAllocator hands out)."""
    j = pos // P
    page_id = N * (1 + req * 8 + j // N) + j % N
    return page_id * P + pos % P


def sequences(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, H, R + DR, generator=g), torch.randn(n, R + DR, generator=g)) for n in LENS]


# --kv-cache-dtype fp8_e4m3 runs: the layer's per-tensor scales (k for the scores, v for the
# values, SGLang's MLA read convention; the latent is stored divided by k_scale)
FP8_K_SCALE, FP8_V_SCALE = 0.37, 0.41


def fp8_latent(kv):
    """The latent as an fp8 pool stores it and the kernels read it: (scores, values)."""
    stored = (kv / FP8_K_SCALE).to(torch.float8_e4m3fn).float()
    return stored * FP8_K_SCALE, stored[..., :R] * FP8_V_SCALE


def fp8_layer(layer):
    layer.k_scale, layer.v_scale = torch.tensor(FP8_K_SCALE), torch.tensor(FP8_V_SCALE)
    layer.k_scale_float, layer.v_scale_float = FP8_K_SCALE, FP8_V_SCALE
    return layer


def fake_runner(rank, mode="latent", kv_dtype=torch.float32):
    cfg = HelixConfig(**CFG, mla_exchange=mode)
    pool = HelixMLATokenToKVPool(2 * N * P * 20, P, kvp=N, kvp_rank=rank, dtype=kv_dtype,
                                 kv_lora_rank=R, qk_rope_head_dim=DR, layer_num=1, device="cpu",
                                 enable_memory_saver=False)
    req_to_token = torch.zeros(len(LENS), CTX, dtype=torch.int32)
    for i, n in enumerate(LENS):
        req_to_token[i, :n] = torch.tensor([loc_of(i, p) for p in range(n)])
    return SimpleNamespace(device="cpu", dtype=torch.float32,
                           req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                           token_to_kv_pool=pool, server_args=SimpleNamespace(_helix_config=cfg),
                           model_config=SimpleNamespace(context_len=CTX, kv_lora_rank=R))


def batch(mode, spans):
    """spans: per request (start, stop) positions computed in this forward. TARGET_VERIFY: the
    positions are chain drafts over the committed `start` tokens (SGLang's verify batch: seq_lens
    = committed lengths, spec_info with the QLEN_ONLY tree mask of a chain)."""
    verify = mode == ForwardMode.TARGET_VERIFY
    n = spans[0][1] - spans[0][0]
    chain = torch.ones(n, n, dtype=torch.bool).tril().repeat(len(spans), 1, 1).reshape(-1)
    spec = SimpleNamespace(draft_token_num=n, custom_mask=chain) if verify else None
    seq_lens = torch.tensor([a if verify else b for a, b in spans])
    return SimpleNamespace(
        forward_mode=mode, req_pool_indices=torch.arange(len(spans)), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), spec_info=spec,
        out_cache_loc=torch.tensor([loc_of(i, p) for i, (a, b) in enumerate(spans) for p in range(a, b)]),
        extend_seq_lens_cpu=[b - a for a, b in spans], extend_prefix_lens_cpu=[a for a, _ in spans])


def w_uv_all():
    """A W_UV of all H heads [H, R, Dv] for the value-exchange runs."""
    return torch.randn(H, R, DV, generator=torch.Generator().manual_seed(6)) * R ** -0.5


def _backend_rank(rank, world, mode="latent", fp8=False):
    import torch.distributed as dist

    seqs = sequences()
    kv_dtype = torch.float8_e4m3fn if fp8 else torch.float32
    backend = HelixMLABackend(fake_runner(rank, mode, kv_dtype), rank=rank, kvp_group=dist.group.WORLD)
    extra = {"w_uv": w_uv_all()} if mode == "value" else {}
    layer = SimpleNamespace(layer_id=0, scaling=SCALE)
    if fp8:
        layer = fp8_layer(layer)
    plan = [(ForwardMode.EXTEND, [(0, CHUNK1[i]) for i in range(2)]),
            (ForwardMode.EXTEND, [(CHUNK1[i], CHUNK2_END[i]) for i in range(2)])]
    plan += [(ForwardMode.DECODE, [(CHUNK2_END[i] + s, CHUNK2_END[i] + s + 1) for i in range(2)])
             for s in range(DECODE_STEPS)]
    committed = [CHUNK2_END[i] + DECODE_STEPS for i in range(2)]
    plan += [(ForwardMode.TARGET_VERIFY, [(c, c + DRAFTS) for c in committed])]
    results = []
    for mode, spans in plan:
        fb = batch(mode, spans)
        q = torch.cat([seqs[i][0][a:b] for i, (a, b) in enumerate(spans)])
        kv = torch.cat([seqs[i][1][a:b] for i, (a, b) in enumerate(spans)])
        if mode == ForwardMode.DECODE:
            backend.init_forward_metadata(fb)
        kv_in = kv.clone()
        out = backend.forward(q, kv[:, None], kv[:, None, :R], layer, fb, **extra)
        assert torch.equal(kv, kv_in)  # the fp8 store divides a copy, never the caller's tensor
        results.append((spans, out))
    return results


BACKEND_CASES = [("latent", False), ("value", False), ("latent", True)]


def _all_backend_runs(rank, world):
    """Every backend case and the stored-rows check on the same spawned ranks (each spawn imports
    SGLang: one spawn for the module, not one per case)."""
    return ({case: _backend_rank(rank, world, *case) for case in BACKEND_CASES},
            _stored_rows_rank(rank, world))


@pytest.fixture(scope="module")
def backend_runs():
    per_rank = run_ranks(_all_backend_runs, N, timeout=400)
    return ({case: [r[0][case] for r in per_rank] for case in BACKEND_CASES},
            [r[1] for r in per_rank])


@pytest.mark.parametrize("mode, fp8", BACKEND_CASES)
def test_backend_extend_prefix_and_decode_match_dense_attention(mode, fp8, backend_runs):
    """Chunked prefill (2nd chunk over a cached, non-page-aligned prefix), 3 decode steps
    crossing page boundaries and a speculative verify of 3 chain drafts over the committed tokens
    (causal among the drafts), 2 KVP ranks: rank g's heads == dense attention over all tokens
    (value exchange: the backend is handed W_UV of all heads and returns values == dense
    attention then W_UV). fp8: an fp8_e4m3 pool with per-tensor scales; the reference attends
    the latent as stored and read (every token, the chunk's own included, through fp8)."""
    per_rank = backend_runs[0][mode, fp8]
    seqs = sequences()
    width = DV if mode == "value" else R
    for step in range(len(per_rank[0])):
        spans = per_rank[0][step][0]
        outs = torch.cat([per_rank[g][step][1].view(-1, H // N, width) for g in range(N)], dim=1)
        row = 0
        for i, (a, b) in enumerate(spans):
            for pos in range(a, b):
                visible = seqs[i][1][:pos + 1]
                if fp8:
                    keys, values = fp8_latent(visible)
                    scores = seqs[i][0][pos].double() @ keys.double().T * SCALE
                    want = (torch.softmax(scores, -1) @ values.double()).float()
                else:
                    want = dense_latent_attention(seqs[i][0][pos], visible, SCALE, R)
                if mode == "value":
                    want = torch.einsum("hr,hrd->hd", want, w_uv_all())
                torch.testing.assert_close(outs[row], want, rtol=1e-4, atol=1e-5)
                row += 1


def test_backend_refuses_w_uv_mismatching_the_layout():
    for mode, extra, match in (("value", {}, "must pass w_uv"),
                               ("latent", {"w_uv": w_uv_all()}, "passed w_uv")):
        backend = SimpleNamespace(cfg=HelixConfig(**CFG, mla_exchange=mode))
        with pytest.raises(HelixConfigError, match=match):
            HelixMLABackend._value_projection(backend, extra)


def test_backend_stores_latent_only_on_owner(backend_runs):
    """Every rank is handed every token's latent; each pool keeps only its own pages."""
    per_rank = backend_runs[1]
    seqs = sequences()
    for rank, stored in enumerate(per_rank):
        for (i, pos), row in stored.items():
            owner = (pos // P) % N
            if owner == rank:
                assert torch.equal(row, seqs[i][1][pos]), (rank, i, pos)
            else:
                assert not torch.equal(row, seqs[i][1][pos]), (rank, i, pos)


def _stored_rows_rank(rank, world):
    import torch.distributed as dist

    runner = fake_runner(rank)
    backend = HelixMLABackend(runner, rank=rank, kvp_group=dist.group.WORLD)
    seqs = sequences()
    fb = batch(ForwardMode.EXTEND, [(0, n) for n in LENS])
    q = torch.cat([s[0] for s in seqs])
    kv = torch.cat([s[1] for s in seqs])
    backend.forward(q, kv[:, None], kv[:, None, :R], SimpleNamespace(layer_id=0, scaling=SCALE), fb)
    pool = runner.token_to_kv_pool
    buf = pool.get_key_buffer(0)[:, 0]
    out = {}
    for i, n in enumerate(LENS):
        for pos in range(n):
            rows, owned = pool.local_rows(torch.tensor([loc_of(i, pos)]))
            out[(i, pos)] = buf[rows[0]].clone() if bool(owned[0]) else torch.full((R + DR,), float("nan"))
    return out


def test_backend_refuses_non_helix_pool():
    runner = fake_runner(0)
    runner.token_to_kv_pool = object()
    with pytest.raises(HelixPoolError, match="pool hooks are not live"):
        HelixMLABackend(runner, rank=0, kvp_group=object())


# ----------------------------------------------------------------------------- hooks


def test_hooks_pass_through_with_helix_off():
    assert sm.mla_config() is None  # no published ServerArgs in pytest
    calls = []
    original = lambda *a, **k: calls.append(a) or "orig"  # noqa: E731
    attn = SimpleNamespace(current_attention_backend="x")
    assert sm._around_dispatch(original, attn, "fb") == "orig"
    assert sm._around_prepare(original, attn, 1, 2) == "orig"
    assert sm._around_core(original, attn, 1, 2) == "orig"
    assert sm._after_post_load(None, object()) is None
    assert len(calls) == 3 and attn.current_attention_backend == "x"


def test_cpu_handler_routes_torch_native_to_absorbed():
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry

    original = AttentionBackendRegistry.get_handler.__func__
    handler = mla_fix._around_get_handler(original, AttentionBackendRegistry, "torch_native")
    attn = SimpleNamespace()  # no fused_qkv_a_proj_with_mqa: not the AMX path
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_prefix_lens_cpu=[0])
    assert handler(attn, extend) == AttnForwardMethod.MLA
    # other backends keep SGLang's own handler
    assert mla_fix._around_get_handler(original, AttentionBackendRegistry, "fa3") is \
        AttentionBackendRegistry._handlers["fa3"]
