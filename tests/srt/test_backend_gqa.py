"""The "helix" SGLang attention backend on spawned gloo ranks with SGLang's real pool classes.

Each rank builds its Helix pool + colored allocator (same op stream -> same locs everywhere), a
HelixGQABackend with its KVP group from create_kvp_groups, prefills a ragged batch through
forward_extend, decodes several steps (crossing page boundaries, staggered append) through
init_forward_metadata + forward_decode, then prefills a second chunk over the cached (not
page-aligned) prefix (partial attention over local prefix pages + one exchange + merge with the
chunk's causal attention; one request's row is decode-shaped, 1 token over its prefix, as in a
mixed chunk, and the batch carries padding rows, as under DP attention), then verifies chain drafts (a TARGET_VERIFY batch: each request's n
drafts attend its committed tokens and the drafts before them; draft trees:
tests/srt/test_spec_tree_ranks.py). Every output is compared with fp32 full attention over
the whole sequence for the rank's head slice [g*H/N, (g+1)*H/N). One run stores fp8_e4m3 pages
with per-tensor k/v scales: its reference attends every key and value as the pool stores and the
kernels read them (x / scale through fp8, times scale), the chunk's own tokens included.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from helpers import NEEDS_SGLANG
import torch

from sglang_helix.config import HelixConfig
from sglang_helix.ranks import run_ranks

pytestmark = NEEDS_SGLANG

H, K, D, DV, P = 4, 2, 8, 6, 4
SEQS = [13, 22, 5, 1]
STEPS = 6
K_SCALE, V_SCALE = 0.37, 1.9  # the fp8 run's per-tensor layer scales


def _as_read(x, scale, fp8: bool):
    """What the kernels attend for a stored x: fp8 pages round x / scale, then read it * scale."""
    return (x / scale).to(torch.float8_e4m3fn).float() * scale if fp8 else x


class _Mode:
    def __init__(self, decode: bool, verify: bool = False):
        self.decode, self.verify = decode, verify

    def is_decode(self) -> bool:
        return self.decode

    def is_target_verify(self) -> bool:
        return self.verify

    def is_idle(self) -> bool:
        return False


def _full(q, keys, vals, scale):
    """q [Hs, D]; keys [L, Hs, D]; vals [L, Hs, Dv] -> [Hs, Dv] fp32 softmax attention."""
    s = torch.einsum("hd,lhd->hl", q.float(), keys.float()) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vals.float())


def _rank_main(rank: int, world: int, kvp: int, tpa: int, fp8: bool = False):
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    from sglang_helix.srt.cpu import sgl_kernel_stub as sgl_kernel_cpu_stub

    sgl_kernel_cpu_stub.install()
    from helpers import fake_runner

    from sglang_helix.comm import create_kvp_groups
    from sglang_helix.srt.backends.gqa import HelixGQABackend
    from sglang_helix.srt.memory.allocator import HelixPagedAllocator
    from sglang_helix.srt.memory.pools import HelixMHATokenToKVPool

    cfg = HelixConfig(kvp=kvp, tpa=tpa, num_heads=H, num_kv_heads=K, page_size=P)
    kvp_rank, tpa_rank = cfg.kvp_rank(rank), cfg.tpa_rank(rank)
    kv_dtype = torch.float8_e4m3fn if fp8 else torch.float32
    pool = HelixMHATokenToKVPool(256, P, dtype=kv_dtype, head_num=K // tpa, head_dim=D, v_head_dim=DV,
                                    layer_num=1, device="cpu", enable_memory_saver=False,
                                    kvp=kvp, kvp_rank=kvp_rank)
    alloc = HelixPagedAllocator(256, P, torch.float32, "cpu", pool, False, kvp=kvp)
    r2t = torch.zeros(8, 64, dtype=torch.int32)
    runner = fake_runner(cfg, pool, r2t, context_len=64)
    backend = HelixGQABackend(runner, rank=rank, kvp_group=create_kvp_groups(cfg, rank), impl="torch")
    g = torch.Generator().manual_seed(0)  # identical on every rank: same model inputs
    scale, layer = D ** -0.5, SimpleNamespace(layer_id=0, scaling=D ** -0.5)
    if fp8:
        layer.k_scale, layer.v_scale = torch.tensor(K_SCALE), torch.tensor(V_SCALE)
        layer.k_scale_float, layer.v_scale_float = K_SCALE, V_SCALE
    rk, rv = (lambda x: _as_read(x, K_SCALE, fp8)), (lambda x: _as_read(x, V_SCALE, fp8))
    heads = slice(rank * H // world, (rank + 1) * H // world)  # this rank's output heads
    kv_heads = slice(tpa_rank * K // tpa, (tpa_rank + 1) * K // tpa)
    q_heads = slice(tpa_rank * H // tpa, (tpa_rank + 1) * H // tpa)
    keys = [torch.randn(n, K, D, generator=g) for n in SEQS]
    vals = [torch.randn(n, K, DV, generator=g) for n in SEQS]
    q = torch.randn(sum(SEQS), H, D, generator=g)
    seq_t = torch.tensor(SEQS)
    zeros = torch.zeros_like(seq_t)
    locs = alloc.alloc_extend(zeros, zeros, seq_t, seq_t, torch.full_like(seq_t, -1), sum(SEQS))
    start, errs = 0, []
    for i, n in enumerate(SEQS):
        r2t[i, :n] = locs[start : start + n].to(torch.int32)
        start += n
    batch = SimpleNamespace(forward_mode=_Mode(False), out_cache_loc=locs, extend_prefix_lens_cpu=zeros,
                            extend_seq_lens_cpu=seq_t)
    out = backend.forward_extend(q[:, q_heads].reshape(len(q), -1), torch.cat(keys)[:, kv_heads],
                                 torch.cat(vals)[:, kv_heads], layer, batch).view(len(q), -1, DV)
    group = H // K
    start = 0
    for i, n in enumerate(SEQS):  # causal: token t attends to 0..t
        for t in range(n):
            ref = _full(q[start + t, heads], rk(keys[i][: t + 1]).repeat_interleave(group, 1)[:, heads],
                        rv(vals[i][: t + 1]).repeat_interleave(group, 1)[:, heads], scale)
            errs.append(float((out[start + t] - ref).abs().max()))
        start += n
    lens = seq_t.clone()
    req_idx = torch.arange(len(SEQS))
    for _ in range(STEPS):
        lens += 1
        new = alloc.alloc_decode(lens, lens, r2t[req_idx, lens - 2].to(torch.int64))
        r2t[req_idx, lens - 1] = new.to(torch.int32)
        qd, kd, vd = torch.randn(len(SEQS), H, D, generator=g), torch.randn(len(SEQS), K, D, generator=g), \
            torch.randn(len(SEQS), K, DV, generator=g)
        for i in range(len(SEQS)):
            keys[i], vals[i] = torch.cat([keys[i], kd[i : i + 1]]), torch.cat([vals[i], vd[i : i + 1]])
        batch = SimpleNamespace(forward_mode=_Mode(True), seq_lens=lens.clone(), req_pool_indices=req_idx,
                                out_cache_loc=new)
        backend.init_forward_metadata(batch)
        out = backend.forward_decode(qd[:, q_heads].reshape(len(SEQS), -1), kd[:, kv_heads], vd[:, kv_heads],
                                     layer, batch).view(len(SEQS), -1, DV)
        for i in range(len(SEQS)):
            ref = _full(qd[i, heads], rk(keys[i]).repeat_interleave(group, 1)[:, heads],
                        rv(vals[i]).repeat_interleave(group, 1)[:, heads], scale)
            errs.append(float((out[i] - ref).abs().max()))
    dec_shape = tuple(out.shape)
    errs.append(_extend_over_prefix(backend, alloc, r2t, lens, keys, vals, g, cfg, rank, layer, rk, rv))
    errs.append(_verify_chain(backend, alloc, r2t, lens + torch.tensor(NEW), keys, vals, g, cfg, rank,
                              layer, rk, rv))
    return max(errs), dec_shape


NEW = [5, 3, 9, 1]  # chunk lengths after the cached (decoded) prefix; the last a decode-shaped row
PAD = 2  # padding rows appended to that batch, as DP attention pads to the attention TP size


def _extend_over_prefix(backend, alloc, r2t, lens, keys, vals, g, cfg, rank, layer, rk, rv) -> float:
    """A second prefill chunk per request over its cached prefix (lens, not page-aligned)."""
    world, tpa_rank = cfg.world_size, cfg.tpa_rank(rank)
    new = torch.tensor(NEW)
    req_idx = torch.arange(len(NEW))
    locs = alloc.alloc_extend(lens, lens, lens + new, lens + new, r2t[req_idx, lens - 1].to(torch.int64),
                              int(new.sum()))
    start = 0
    for i, n in enumerate(NEW):
        r2t[i, int(lens[i]) : int(lens[i]) + n] = locs[start : start + n].to(torch.int32)
        start += n
    rows = int(new.sum()) + PAD  # DP attention pads the rows (no request; their KV to slot 0)
    qn = torch.randn(rows, H, D, generator=g)
    kn, vn = torch.randn(rows, K, D, generator=g), torch.randn(rows, K, DV, generator=g)
    batch = SimpleNamespace(forward_mode=_Mode(False), out_cache_loc=torch.cat([locs, locs.new_zeros(PAD)]),
                            extend_prefix_lens_cpu=lens.clone(), extend_seq_lens_cpu=new, req_pool_indices=req_idx)
    backend.init_forward_metadata(batch)
    assert backend._mixed_seen  # request 3's 1-token row over its prefix rides with the chunks
    q_heads = slice(tpa_rank * H // cfg.tpa, (tpa_rank + 1) * H // cfg.tpa)
    kv_heads = slice(tpa_rank * K // cfg.tpa, (tpa_rank + 1) * K // cfg.tpa)
    out = backend.forward_extend(qn[:, q_heads].reshape(len(qn), -1), kn[:, kv_heads], vn[:, kv_heads],
                                 layer, batch).view(len(qn), -1, DV)
    assert out.shape[0] == rows and not out[rows - PAD:].any()  # padding rows attend nothing
    heads, group, errs, start = slice(rank * H // world, (rank + 1) * H // world), H // K, [], 0
    for i, n in enumerate(NEW):
        k_all = rk(torch.cat([keys[i], kn[start : start + n]])).repeat_interleave(group, 1)[:, heads]
        v_all = rv(torch.cat([vals[i], vn[start : start + n]])).repeat_interleave(group, 1)[:, heads]
        for t in range(n):
            stop = int(lens[i]) + t + 1
            ref = _full(qn[start + t, heads], k_all[:stop], v_all[:stop], D ** -0.5)
            errs.append(float((out[start + t] - ref).abs().max()))
        keys[i], vals[i] = torch.cat([keys[i], kn[start : start + n]]), torch.cat([vals[i], vn[start : start + n]])
        start += n
    return max(errs)


DRAFTS = 3


def _verify_chain(backend, alloc, r2t, lens, keys, vals, g, cfg, rank, layer, rk, rv) -> float:
    """A TARGET_VERIFY batch of DRAFTS chain drafts per request over its committed `lens` tokens
    (slots allocated ahead, as SGLang's spec decode does; trees: tests/srt/test_spec_tree_ranks.py)."""
    n, bs = DRAFTS, len(lens)
    req_idx = torch.arange(bs)
    locs = alloc.alloc_extend(lens, lens, lens + n, lens + n, r2t[req_idx, lens - 1].to(torch.int64), bs * n)
    for i in range(bs):
        r2t[i, int(lens[i]) : int(lens[i]) + n] = locs[i * n : (i + 1) * n].to(torch.int32)
    chain = torch.ones(n, n, dtype=torch.bool).tril()  # SGLang's QLEN_ONLY mask of a chain
    spec = SimpleNamespace(draft_token_num=n, custom_mask=chain.repeat(bs, 1, 1).reshape(-1))
    batch = SimpleNamespace(forward_mode=_Mode(False, verify=True), out_cache_loc=locs, seq_lens=lens.clone(),
                            seq_lens_cpu=lens.clone(), req_pool_indices=req_idx, spec_info=spec)
    backend.init_forward_metadata(batch)
    qn = torch.randn(bs * n, H, D, generator=g)
    kn, vn = torch.randn(bs * n, K, D, generator=g), torch.randn(bs * n, K, DV, generator=g)
    tpa_rank, world = cfg.tpa_rank(rank), cfg.world_size
    q_heads = slice(tpa_rank * H // cfg.tpa, (tpa_rank + 1) * H // cfg.tpa)
    kv_heads = slice(tpa_rank * K // cfg.tpa, (tpa_rank + 1) * K // cfg.tpa)
    out = backend.forward_extend(qn[:, q_heads].reshape(len(qn), -1), kn[:, kv_heads], vn[:, kv_heads],
                                 layer, batch).view(len(qn), -1, DV)
    heads, group, errs = slice(rank * H // world, (rank + 1) * H // world), H // K, []
    for i in range(bs):
        rows = slice(i * n, (i + 1) * n)
        k_all = rk(torch.cat([keys[i], kn[rows]])).repeat_interleave(group, 1)[:, heads]
        v_all = rv(torch.cat([vals[i], vn[rows]])).repeat_interleave(group, 1)[:, heads]
        for t in range(n):
            stop = int(lens[i]) + t + 1
            ref = _full(qn[i * n + t, heads], k_all[:stop], v_all[:stop], D ** -0.5)
            errs.append(float((out[i * n + t] - ref).abs().max()))
    assert backend.extend_plan.chunk_masks is None  # a chain: the causal chunk path
    return max(errs)


CASES = [(2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)]


def _cases_main(rank: int, world: int, cases) -> dict:
    """Every case of one world size on the same spawned ranks (each spawn imports SGLang: one
    spawn per world size, not per case)."""
    return {case: _rank_main(rank, world, *case) for case in cases}


@pytest.fixture(scope="module")
def results_by_case() -> dict:
    out: dict = {}
    for world in sorted({kvp * tpa for kvp, tpa, _ in CASES}):
        cases = [c for c in CASES if c[0] * c[1] == world]
        per_rank = run_ranks(_cases_main, world, (cases,), timeout=300)
        out.update({case: [r[case] for r in per_rank] for case in cases})
    return out


@pytest.mark.parametrize("kvp,tpa,fp8", CASES)
def test_helix_backend_prefill_and_decode_match_full_attention(kvp, tpa, fp8, results_by_case):
    results = results_by_case[kvp, tpa, fp8]
    for err, shape in results:
        assert shape == (len(SEQS), H // (kvp * tpa), DV)  # decode; extend errors are in err
        assert err < 1e-5, results


def test_create_kvp_groups_orders_ranks():
    from sglang_helix.comm import create_kvp_groups

    made = []
    cfg = HelixConfig(kvp=2, tpa=2, num_heads=4, num_kv_heads=2)
    mine = create_kvp_groups(cfg, 3, group_factory=lambda ranks: made.append(ranks) or tuple(ranks))
    assert made == [[0, 1], [2, 3]] and mine == (2, 3)
    assert create_kvp_groups(HelixConfig(kvp=1, tpa=2, num_heads=4, num_kv_heads=2), 1) is None


def test_create_kvp_groups_in_every_attention_group():
    """DP attention / PP: the world holds several attention groups of N consecutive ranks; every
    rank creates every group's KVP groups (collective), keeping its own attention group's."""
    from sglang_helix.comm import HelixCommError, create_kvp_groups

    made = []
    cfg = HelixConfig(kvp=2, tpa=2, num_heads=4, num_kv_heads=2)
    mine = create_kvp_groups(cfg, 1, group_factory=lambda ranks: made.append(ranks) or tuple(ranks),
                             attention_groups=2, attention_group=1)
    assert made == [[0, 1], [2, 3], [4, 5], [6, 7]] and mine == (4, 5)
    with pytest.raises(HelixCommError, match="attention group 2 outside"):
        create_kvp_groups(cfg, 1, group_factory=lambda ranks: None, attention_groups=2, attention_group=2)


SGLANG_CHECKS = {"backend: helix registered once, with its CLI choice": """
from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang_helix.srt.backends.factory import create_helix_backend
assert ATTENTION_BACKENDS["helix"] is create_helix_backend
assert ATTENTION_BACKEND_CHOICES.count("helix") == 1  # the probe installs the table twice
"""}


def test_helix_backend_registered_once(sglang_checks):
    sglang_checks.assert_ok("backend: helix registered once, with its CLI choice")