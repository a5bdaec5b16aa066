"""HelixAttention over N spawned gloo ranks == single-rank full attention.

One spawn per world size (2 and 4) runs every case of that size: MLA KVP 2/4, GQA KVP x TPA in
{2x1, 1x2, 2x2}; page sizes 1/16/64 with shuffled physical pages; ragged batches whose short
requests leave whole KVP ranks empty; HOP-B slices 1/2/3; a2a and ag_rs; fp32 and bf16.
Ranks rebuild their inputs from the case spec (seeded) and return [B, H/N, Dv]; the parent
gathers the N head slices in rank order and compares with full attention.

Tolerances: fp32 atol=rtol=1e-5 (only summation order differs). bf16: inputs are bf16 and the
reference runs in fp32 on those same values; Helix exchanges fp32 partials by default and rounds
the merged output once; the "activation" exchange cases (--helix-exchange-dtype) round each
partial to bf16 too, so expect ~2 bf16 roundings (2^-8 relative each): atol=rtol=1.6e-2 for both.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist

from sglang_helix.comm import a2a_bytes_per_rank
from sglang_helix.config import HelixConfig
from sglang_helix.decode import HelixAttention
from sglang_helix.kernels.reference import full_attention_ref
from sglang_helix.dev.paged import build_local_paged_cache
from sglang_helix.ranks import run_ranks

H, K_GQA, D, DV = 8, 4, 16, 12  # GQA: Dv != D so a K/V mix-up cannot pass
R, DR = 48, 8  # MLA latent rank and rope dims (DeepSeek-like ratio 512:64)
SEQS = {1: [1, 2, 7, 9], 16: [5, 16, 17, 40, 70], 64: [3, 64, 70, 130]}
LONG_SEQS = [300, 257, 1000, 5, 640]  # same B as SEQS[16]: the bytes-vs-context check
LAYOUTS = {2: [("mla", 2, 1), ("gqa", 2, 1), ("gqa", 1, 2)], 4: [("mla", 4, 1), ("gqa", 2, 2)]}
# "auto" is what a server runs; "reference" is the per-row fp32 loop, whose result cannot depend
# on how the batch is sliced, so HOP-B must be bitwise there (see test_hopb_slices_*).
IMPLS = ("auto", "reference")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def make_specs(world: int) -> list[dict]:
    """Every case for one world size. dtype depends on (P, backend, impl), never on the HOP-B
    slice count, so each backend/impl meets both dtypes and slice counts stay comparable."""
    specs = []
    for kind, kvp, tpa in LAYOUTS[world]:
        combos = itertools.product(enumerate(sorted(SEQS)), (1, 2, 3),
                                   enumerate(("a2a", "ag_rs")), enumerate(IMPLS))
        for (pi, page), slices, (bi, backend), (ii, impl) in combos:
            dtype = (torch.float32, torch.bfloat16)[(pi + bi + ii) % 2]
            specs.append(dict(kind=kind, kvp=kvp, tpa=tpa, page=page, slices=slices,
                              backend=backend, dtype=dtype, seqs=SEQS[page], seed=7, impl=impl,
                              exchange="fp32"))
        # same batch size, much longer context: bytes on the wire must not change
        twin = next(s for s in specs[-36:] if s["page"] == 16 and s["slices"] == 1
                    and s["backend"] == "a2a" and s["impl"] == "auto")
        specs.append({**twin, "seqs": LONG_SEQS, "seed": 8})
        # --helix-exchange-dtype activation: bf16 partials on the wire (HOP-B 1 and 2, both backends)
        for slices, backend in itertools.product((1, 2), ("a2a", "ag_rs")):
            specs.append(dict(kind=kind, kvp=kvp, tpa=tpa, page=16, slices=slices, backend=backend,
                              dtype=torch.bfloat16, seqs=SEQS[16], seed=9, impl="auto",
                              exchange="activation"))
    return specs


def make_inputs(spec: dict):
    """Full (unsharded) inputs: q [B, H, Dq] tensors and per-request KV [L_b, ...]."""
    gen = torch.Generator().manual_seed(spec["seed"] + 31 * spec["page"])
    dtype, seqs = spec["dtype"], spec["seqs"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if spec["kind"] == "mla":
        return dict(q_latent=rand(len(seqs), H, R), q_rope=rand(len(seqs), H, DR),
                    kv=[rand(n, R + DR) for n in seqs])
    return dict(q=rand(len(seqs), H, D), k=[rand(n, K_GQA, D) for n in seqs],
                v=[rand(n, K_GQA, DV) for n in seqs])


def scale_of(spec: dict) -> float:
    return (R + DR) ** -0.5 if spec["kind"] == "mla" else D**-0.5


def config_of(spec: dict) -> HelixConfig:
    mla = spec["kind"] == "mla"
    return HelixConfig(kvp=spec["kvp"], tpa=spec["tpa"], num_heads=H,
                       num_kv_heads=1 if mla else K_GQA, mla=mla, page_size=spec["page"],
                       comm_backend=spec["backend"], hopb_slices=spec["slices"],
                       exchange_dtype=spec["exchange"])


def reference(spec: dict) -> torch.Tensor:
    """Single-rank full attention, fp32: [B, H, Dv]."""
    x, outs = make_inputs(spec), []
    for b in range(len(spec["seqs"])):
        if spec["kind"] == "mla":
            kv = x["kv"][b].float()
            q = torch.cat([x["q_latent"][b], x["q_rope"][b]], -1)
            k = kv.unsqueeze(1).expand(-1, H, -1)
            v = kv[:, :R].unsqueeze(1).expand(-1, H, -1)
        else:
            q = x["q"][b]
            k = x["k"][b].repeat_interleave(H // K_GQA, dim=1)
            v = x["v"][b].repeat_interleave(H // K_GQA, dim=1)
        outs.append(full_attention_ref(q, k, v, scale_of(spec))[0])
    return torch.stack(outs)


def _groups_for(cfg: HelixConfig, cache: dict):
    """KVP groups of a layout, created once and in the same order on every rank."""
    key = (cfg.kvp, cfg.tpa)
    if key not in cache:
        cache[key] = (
            [dist.new_group(cfg.kvp_group_ranks(t)) for t in range(cfg.tpa)]
            if cfg.kvp > 1
            else None
        )
    return cache[key]


def _run_case(rank: int, spec: dict, groups) -> dict:
    cfg, x = config_of(spec), make_inputs(spec)
    kvp_rank, t = cfg.kvp_rank(rank), cfg.tpa_rank(rank)
    group = groups[t] if groups else None
    if spec["kind"] == "mla":
        seqs = x["kv"]
    else:
        kh = slice(t * cfg.kv_heads_per_tpa, (t + 1) * cfg.kv_heads_per_tpa)
        seqs = [torch.cat([k[:, kh], v[:, kh]], -1) for k, v in zip(x["k"], x["v"])]
    cache, table = build_local_paged_cache(
        seqs, cfg.page_size, cfg.kvp, kvp_rank, seed=spec["seed"]
    )
    helix = HelixAttention(cfg, rank, group, max_batch=len(seqs) + 2,
                           max_local_pages=table.shape[1] + 3, kernels=spec["impl"])
    helix.plan(torch.tensor(spec["seqs"]), table)
    if spec["kind"] == "mla":
        out = helix.forward_mla(x["q_latent"], x["q_rope"], cache, scale_of(spec))
    else:
        qh = slice(t * cfg.heads_per_tpa, (t + 1) * cfg.heads_per_tpa)
        k_cache, v_cache = cache[..., :D].contiguous(), cache[..., D:].contiguous()
        out = helix.forward_gqa(x["q"][:, qh].contiguous(), k_cache, v_cache, scale_of(spec))
    return dict(out=out, bytes=helix.exchange.stats.bytes_sent, calls=helix.exchange.stats.calls,
                local_lens=helix.meta.seq_lens.tolist())


def _helix_rank(rank: int, world: int, specs: list[dict]):
    groups_cache: dict = {}
    return [_run_case(rank, spec, _groups_for(config_of(spec), groups_cache)) for spec in specs]


_RESULTS: dict = {}


def results_for(world: int):
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(_helix_rank, world, args=(make_specs(world),), timeout=300)
    return _RESULTS[world]


def _cases():
    return [(w, i) for w in sorted(LAYOUTS) for i in range(len(make_specs(w)))]


def _case_id(case) -> str:
    w, i = case
    s = make_specs(w)[i]
    return (f"{s['kind']}-kvp{s['kvp']}xtpa{s['tpa']}-P{s['page']}-s{s['slices']}-{s['backend']}-"
            f"{str(s['dtype'])[6:]}-{s['impl']}-L{max(s['seqs'])}-x{s['exchange']}")


def _expected_bytes(spec: dict) -> int:
    cfg = config_of(spec)
    if cfg.kvp == 1:
        return 0
    bsz, hl = len(spec["seqs"]), cfg.heads_per_tpa
    dv = R if spec["kind"] == "mla" else DV
    if spec["backend"] == "a2a":  # fp32 partials, or the activation dtype's (--helix-exchange-dtype)
        itemsize = 4 if spec["exchange"] == "fp32" else spec["dtype"].itemsize
        return a2a_bytes_per_rank(bsz, hl, dv, itemsize, cfg.kvp)
    return bsz * hl * 4 * (cfg.kvp - 1) + bsz * hl * dv * 4 * (cfg.kvp - 1) // cfg.kvp


@pytest.mark.multirank
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_helix_matches_full_attention(case):
    world, i = case
    spec, results = make_specs(world)[i], results_for(world)
    gathered = torch.cat([results[g][i]["out"] for g in range(world)], dim=1)  # head order
    assert gathered.dtype == spec["dtype"]
    expect = reference(spec)
    assert gathered.shape == expect.shape
    torch.testing.assert_close(gathered.float(), expect, **TOL[spec["dtype"]])


@pytest.mark.multirank
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_bytes_per_rank_formula_and_context_independent(world):
    specs, results = make_specs(world), results_for(world)
    for i, spec in enumerate(specs):
        for g in range(world):
            assert results[g][i]["bytes"] == _expected_bytes(spec), (_case_id((world, i)), g)
            assert results[g][i]["calls"] == (min(spec["slices"], len(spec["seqs"])))
    for i, spec in enumerate(specs):
        if spec["seqs"] != LONG_SEQS:
            continue
        # its twin: same layout, B, dtype and backend, 2.5-14x fewer tokens per request
        twin = specs.index({**spec, "seqs": SEQS[16], "seed": 7})
        assert results[0][i]["bytes"] == results[0][twin]["bytes"]
        assert results[0][i]["bytes"] > 0 or spec["kvp"] == 1


@pytest.mark.multirank
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_hopb_slices_match_unsliced(world):
    """HOP-B slices 2/3 vs 1: bitwise with a2a + the per-row reference kernel.

    The vectorised CPU path ("auto" -> torch) pads each slice to its own max length, so its LSE
    can move by an ulp with the slicing (a kernel property, not the exchange's): tight tolerance.
    """
    specs, results = make_specs(world), results_for(world)
    checked = 0
    for i, spec in enumerate(specs):
        if spec["slices"] == 1:
            continue
        base = specs.index({**spec, "slices": 1})
        for g in range(world):
            got, want = results[g][i]["out"], results[g][base]["out"]
            if spec["backend"] == "a2a" and spec["impl"] == "reference":
                assert torch.equal(got, want), _case_id((world, i))
                checked += 1
            else:
                tol = 1e-6 if spec["dtype"] == torch.float32 else 8e-3
                torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert checked


@pytest.mark.multirank
def test_empty_shards_present():
    """The batches really leave some KVP ranks with 0 tokens (else the test proves less)."""
    results, specs = results_for(4), make_specs(4)
    empties = [r for g in range(4) for i, s in enumerate(specs) if s["kvp"] == 4
               for r in results[g][i]["local_lens"] if r == 0]
    assert empties


# ---- single process: the cache builder, metadata and HelixAttention validation ----------------


@pytest.mark.parametrize("page, kvp", [(1, 2), (16, 4), (4, 3)])
def test_local_paged_cache_holds_the_rank_tokens(page, kvp):
    from sglang_helix.sharding import local_seq_len, token_owner

    seqs = [torch.arange(n, dtype=torch.float32).unsqueeze(-1) for n in (1, 5, 37, 70)]
    for r in range(kvp):
        cache, table = build_local_paged_cache(seqs, page, kvp, r, seed=3)
        for b, seq in enumerate(seqs):
            n = int(local_seq_len(seq.shape[0], r, page, kvp))
            pages = (n + page - 1) // page
            got = cache[table[b, :pages].long()].reshape(-1)[:n]
            pos = torch.arange(seq.shape[0])
            want = seq[token_owner(pos, page, kvp) == r].reshape(-1)
            assert torch.equal(got, want), (page, kvp, r, b)


def test_metadata_plan_fills_preallocated_buffers():
    cfg = HelixConfig(kvp=1, tpa=1, num_heads=2, num_kv_heads=1, page_size=4, hopb_slices=2)
    helix = HelixAttention(cfg, 0, None, max_batch=4, max_local_pages=5)
    seq_buf, table_buf = helix.meta.seq_lens_buf, helix.meta.page_table_buf
    helix.plan(torch.tensor([3, 9, 0]), torch.tensor([[7, 0, 0], [1, 2, 3], [0, 0, 0]]))
    assert helix.meta.seq_lens.tolist() == [3, 9, 0]
    assert helix.meta.page_table.shape == (3, 5)
    assert helix.meta.page_table[1, :3].tolist() == [1, 2, 3]
    assert helix.meta.seq_lens.data_ptr() == seq_buf.data_ptr()  # views, never reallocated
    assert helix.meta.page_table.data_ptr() == table_buf.data_ptr()
    assert helix.meta.slices == [(0, 2), (2, 3)] and helix.meta.max_local_len == 9
    helix.plan(torch.tensor([2]), torch.tensor([[4]]))
    assert helix.meta.page_table[0].tolist() == [4, 0, 0, 0, 0]  # stale columns cleared
    with pytest.raises(ValueError, match="max_batch"):
        helix.plan(torch.zeros(5, dtype=torch.int64), torch.zeros(5, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_local_pages"):
        helix.plan(torch.tensor([1]), torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs 3 local pages"):
        helix.plan(torch.tensor([9]), torch.zeros(1, 2, dtype=torch.int32))


def test_helix_attention_validation():
    from sglang_helix.config import HelixConfigError

    gqa = HelixConfig(kvp=1, tpa=1, num_heads=4, num_kv_heads=2, page_size=2)
    helix = HelixAttention(gqa, 0, None, max_batch=2, max_local_pages=2)
    helix.plan(torch.tensor([3]), torch.tensor([[0, 1]]))
    kc, vc = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    assert helix.forward_gqa(torch.randn(1, 4, 8), kc, vc, 0.3).shape == (1, 4, 8)
    with pytest.raises(HelixConfigError, match="forward_mla"):
        helix.forward_mla(torch.randn(1, 4, 8), torch.randn(1, 4, 2), kc, 0.3)
    with pytest.raises(ValueError, match=r"q must be \[B, 4, D\]"):
        helix.forward_gqa(torch.randn(1, 2, 8), kc, vc, 0.3)
    with pytest.raises(ValueError, match="plan"):
        helix.forward_gqa(torch.randn(2, 4, 8), kc, vc, 0.3)
    with pytest.raises(HelixConfigError, match="process group"):
        HelixAttention(HelixConfig(kvp=2, num_heads=2), 0, None, max_batch=1, max_local_pages=1)


# ---- the harness itself ------------------------------------------------------------------------


def _failing_rank(rank: int, world: int):
    import time

    if rank == 0:
        raise ValueError("boom from rank zero")
    time.sleep(600)  # never finishes: the harness must kill it


@pytest.mark.multirank
def test_run_ranks_reports_failures_and_kills_stragglers():
    import time

    from sglang_helix.ranks import RankFailure

    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        # rank 0 must have started and failed within the timeout: 20 s leaves room for a
        # spawned interpreter's torch import on a loaded 2-core machine (the suite runs the
        # real-server tests beside this one)
        run_ranks(_failing_rank, 2, timeout=20)
    msg = str(info.value)
    assert "rank 0" in msg and "boom from rank zero" in msg and "ValueError" in msg
    assert "rank 1: timed out" in msg
    assert time.monotonic() - t0 < 60


def _aborts_at_exit(rank: int, world: int):
    import atexit

    atexit.register(os.abort)  # what a C++ library's teardown crash looks like from outside
    return rank * 10


@pytest.mark.multirank
def test_run_ranks_ignores_crashes_in_interpreter_teardown():
    # The result is saved and the groups destroyed before the rank leaves; finalization (where
    # gloo's threads once SIGABRTed a rank in CI) must not turn a finished run into a failure.
    assert run_ranks(_aborts_at_exit, 2, timeout=60) == [0, 10]
