"""Draft trees under Helix on spawned gloo ranks, with SGLang's real pool classes and the helix
GQA backend (srt.backends.spec_plans, srt.memory.pools, core spec_tree):

1. a tree TARGET_VERIFY batch over a KV-sharded committed prefix: every node attends the whole
   prefix (partial attention + exchange) and its ancestors under the tree mask, equal to fp32
   dense attention over exactly those keys;
2. the accept: each request's accepted path moves its KV from the nodes' verify slots to the
   path's positions (`move_kv_cache`, sources and targets on different KVP ranks: the all-gather
   move); a decode step over the new length then attends the path in place, equal to dense
   attention over prefix + path;
3. a tree's draft steps in SGLang's page-aligned branch layout: the prefix's tail page copied into
   each branch's first page (a cross-rank move), step s of branch t attends the prefix and its own
   drafts 0..s, each rank the pages of its colour; equal to dense attention;
4. the pools' cross-rank move itself (GQA and MLA pools, fp32 and fp8 pages) equals an unsharded
   move, byte for byte, on every rank.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from helpers import NEEDS_SGLANG, tree_mask

from sglang_helix.config import HelixConfig
from sglang_helix.ranks import run_ranks

pytestmark = NEEDS_SGLANG

H, K, D, DV, P = 4, 2, 8, 6, 4
SEQS = [13, 6, 9]
PARENTS = [-1, 0, 0, 1, 2, 3]  # SGLang's verify tree: root (the bonus token), then drafts
PATHS = [[0, 2, 4], [0, 1, 3, 5], [0]]  # accepted nodes per request (root first)
TOPK, STEPS = 2, 3


class _Mode:
    def __init__(self, decode: bool, verify: bool = False):
        self.decode, self.verify = decode, verify

    def is_decode(self):
        return self.decode

    def is_target_verify(self):
        return self.verify

    def is_idle(self):
        return False


def _dense(q, keys, vals, scale):
    """q [Hs, D] over keys [L, Hs, D], vals [L, Hs, Dv]: fp32 softmax attention."""
    s = torch.einsum("hd,lhd->hl", q.float(), keys.float()) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vals.float())


class _Rank:
    """One rank's pool, allocator, request table and GQA backend; K/V of every written loc kept
    (the same on every rank: same seeded stream) for the references."""

    def __init__(self, rank, kvp, tpa):
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        from sglang_helix.srt.cpu import sgl_kernel_stub

        sgl_kernel_stub.install()
        from helpers import fake_runner

        from sglang_helix.comm import create_kvp_groups
        from sglang_helix.srt.memory.allocator import HelixPagedAllocator
        from sglang_helix.srt.memory.pools import HelixMHATokenToKVPool

        self.cfg = cfg = HelixConfig(kvp=kvp, tpa=tpa, num_heads=H, num_kv_heads=K, page_size=P)
        self.rank, tpa_rank = rank, cfg.tpa_rank(rank)
        self.pool = HelixMHATokenToKVPool(512, P, dtype=torch.float32, head_num=K // tpa, head_dim=D,
                                          v_head_dim=DV, layer_num=1, device="cpu",
                                          enable_memory_saver=False, kvp=kvp, kvp_rank=cfg.kvp_rank(rank))
        self.group = create_kvp_groups(cfg, rank)
        self.pool._kvp_group = self.group
        self.alloc = HelixPagedAllocator(512, P, torch.float32, "cpu", self.pool, False, kvp=kvp)
        self.r2t = torch.zeros(4, 96, dtype=torch.int32)
        self.runner = fake_runner(cfg, self.pool, self.r2t, context_len=96)
        self.g = torch.Generator().manual_seed(0)
        self.layer = SimpleNamespace(layer_id=0, scaling=D ** -0.5)
        self.q_heads = slice(tpa_rank * H // tpa, (tpa_rank + 1) * H // tpa)
        self.kv_heads = slice(tpa_rank * K // tpa, (tpa_rank + 1) * K // tpa)
        self.heads = slice(rank * H // cfg.world_size, (rank + 1) * H // cfg.world_size)
        self.kv = {}  # loc -> (k [K, D], v [K, Dv]) as written

    def backend(self, **kwargs):
        from sglang_helix.srt.backends.gqa import HelixGQABackend

        return HelixGQABackend(self.runner, rank=self.rank, kvp_group=self.group, impl="torch", **kwargs)

    def alloc_cols(self, lens, width):
        """Locs of columns lens .. lens + width of each request, allocated with their positions."""
        idx = torch.arange(len(lens))
        last = torch.where(lens > 0, self.r2t[idx, (lens - 1).clamp(min=0)].to(torch.int64), -1)
        locs = self.alloc.alloc_extend(lens, lens, lens + width, lens + width, last, len(lens) * width)
        for i in range(len(lens)):
            self.r2t[i, int(lens[i]):int(lens[i]) + width] = locs[i * width:(i + 1) * width].to(torch.int32)
        return locs

    def write(self, locs):
        """Random K/V for locs (the same on every rank), stored through the pool."""
        k = torch.randn(len(locs), K, D, generator=self.g)
        v = torch.randn(len(locs), K, DV, generator=self.g)
        self.pool.set_kv_buffer(self.layer, locs, k[:, self.kv_heads], v[:, self.kv_heads])
        self.kv.update({int(x): (k[i], v[i]) for i, x in enumerate(locs.tolist())})
        return k, v

    def ref(self, q, locs):
        """Dense attention of q [H, D] over the KV written at locs, this rank's output heads."""
        k = torch.stack([self.kv[int(x)][0] for x in locs]).repeat_interleave(H // K, 1)
        v = torch.stack([self.kv[int(x)][1] for x in locs]).repeat_interleave(H // K, 1)
        return _dense(q[self.heads], k[:, self.heads], v[:, self.heads], D ** -0.5)


def _verify_tree(r: _Rank, lens):
    """1: tree verify over the committed prefix; returns the verify locs and the error."""
    n, bs = len(PARENTS), len(lens)
    locs = r.alloc_cols(lens, n)
    k, v = r.write(locs)  # the verify forward stores every node's KV at its slot (its owner keeps it)
    mask = tree_mask(PARENTS)
    spec = SimpleNamespace(draft_token_num=n, custom_mask=mask.repeat(bs, 1, 1).reshape(-1))
    batch = SimpleNamespace(forward_mode=_Mode(False, verify=True), out_cache_loc=locs, seq_lens=lens.clone(),
                            seq_lens_cpu=lens.clone(), req_pool_indices=torch.arange(bs), spec_info=spec)
    backend = r.backend()
    backend.init_forward_metadata(batch)
    assert backend.extend_plan.chunk_masks is not None
    q = torch.randn(bs * n, H, D, generator=r.g)
    out = backend.forward_extend(q[:, r.q_heads].reshape(bs * n, -1), k[:, r.kv_heads], v[:, r.kv_heads],
                                 r.layer, batch, save_kv_cache=False).view(bs * n, -1, DV)
    errs = []
    for b in range(bs):
        prefix = r.r2t[b, :int(lens[b])].tolist()
        for i in range(n):
            keys = prefix + [int(locs[b * n + j]) for j in range(n) if mask[i, j]]
            errs.append(float((out[b * n + i] - r.ref(q[b * n + i], keys)).abs().max()))
    return locs, max(errs)


def _accept_and_decode(r: _Rank, lens, locs):
    """2: the accepted paths move to their positions; a decode step attends them in place."""
    n, bs = len(PARENTS), len(lens)
    tgt = torch.cat([locs[b * n:b * n + len(path)] for b, path in enumerate(PATHS)])
    src = torch.cat([locs[b * n + torch.tensor(path)] for b, path in enumerate(PATHS)])
    moved = [r.kv[int(s)] for s in src]
    r.pool.move_kv_cache(tgt, src)
    r.kv.update({int(t_): kv for t_, kv in zip(tgt, moved)})
    new = lens + torch.tensor([len(p) for p in PATHS])
    step = r.alloc_cols(new, 1)  # the next token's slot
    k, v = r.write(step)
    batch = SimpleNamespace(forward_mode=_Mode(True), seq_lens=new + 1, req_pool_indices=torch.arange(bs),
                            out_cache_loc=step)
    backend = r.backend()
    backend.init_forward_metadata(batch)
    q = torch.randn(bs, H, D, generator=r.g)
    out = backend.forward_decode(q[:, r.q_heads].reshape(bs, -1), k[:, r.kv_heads], v[:, r.kv_heads], r.layer,
                                 batch, save_kv_cache=False).view(bs, -1, DV)
    errs = [float((out[b] - r.ref(q[b], r.r2t[b, :int(new[b]) + 1].tolist())).abs().max()) for b in range(bs)]
    return new + 1, max(errs)


def _draft_tree_steps(r: _Rank, lens):
    """3: SGLang's page-aligned branch layout, the tail copies, then every draft step."""
    from sglang_helix.spec_tree import branch_page_columns
    from sglang_helix.srt.backends.spec_plans import DraftTreeStep

    bs = len(lens)
    nnp_worst = (P - 1 + STEPS + P - 1) // P
    r.alloc_cols(lens, nnp_worst * P * TOPK)  # SGLang's spec decode reservation (page > 1, top-k > 1)
    base, tail = lens // P * P, lens % P
    nnp = (tail + STEPS + P - 1) // P
    for b in range(bs):  # duplicate_prefix_tail_to_draft_branches
        for t in range(1, TOPK):
            dst = int(base[b]) + t * int(nnp[b]) * P
            src = r.r2t[b, int(base[b]):int(lens[b])].to(torch.int64)
            tgt = r.r2t[b, dst:dst + int(tail[b])].to(torch.int64)
            r.pool.move_kv_cache(tgt, src)
            r.kv.update({int(x): r.kv[int(y)] for x, y in zip(tgt, src)})
    errs = []
    for s in range(STEPS - 1):
        cols = base.repeat_interleave(TOPK) + torch.arange(TOPK).repeat(bs) * nnp.repeat_interleave(TOPK) * P \
            + tail.repeat_interleave(TOPK) + s  # prepare_for_draft's out_cache_loc of step s
        step = r.r2t[torch.arange(bs).repeat_interleave(TOPK), cols].to(torch.int64)
        k, v = r.write(step)
        batch = SimpleNamespace(forward_mode=_Mode(True), seq_lens=lens.clone(), seq_lens_cpu=lens.clone(),
                                req_pool_indices=torch.arange(bs), out_cache_loc=step)
        backend = r.backend(draft_tree=DraftTreeStep(s, TOPK, STEPS))
        backend.init_forward_metadata(batch)
        q = torch.randn(bs * TOPK, H, D, generator=r.g)
        out = backend.forward_decode(q[:, r.q_heads].reshape(bs * TOPK, -1), k[:, r.kv_heads],
                                     v[:, r.kv_heads], r.layer, batch, save_kv_cache=False).view(bs * TOPK, -1, DV)
        vcols, vlens = branch_page_columns(lens, TOPK, STEPS, s, P, 16)
        for row in range(bs * TOPK):
            b, t = divmod(row, TOPK)
            keys = r.r2t[b, :int(lens[b])].tolist() + [  # the prefix, then branch t's drafts 0..s
                int(r.r2t[b, int(base[b]) + t * int(nnp[b]) * P + int(tail[b]) + j]) for j in range(s + 1)]
            errs.append(float((out[row] - r.ref(q[row], keys)).abs().max()))
            pos = torch.arange(int(vlens[row]))
            virtual = (vcols[row, pos // P] * P + pos % P).tolist()  # the layout the backend read
            assert [r.kv[int(r.r2t[b, c])][0].sum() for c in virtual] == [r.kv[x][0].sum() for x in keys]
    return max(errs)


def _rank_main(rank, world, kvp, tpa):
    r = _Rank(rank, kvp, tpa)
    lens = torch.tensor(SEQS)
    r.write(_prefill(r, lens))
    locs, err_verify = _verify_tree(r, lens)
    lens, err_decode = _accept_and_decode(r, lens, locs)
    err_draft = _draft_tree_steps(r, lens)
    moves = [_move(rank, world, *case) for case in MOVES] if tpa == 1 else []
    return (err_verify, err_decode, err_draft), moves


def _prefill(r: _Rank, lens):
    """Locs of the committed prompts (positions 0 .. len - 1)."""
    zeros = torch.zeros_like(lens)
    locs = r.alloc.alloc_extend(zeros, zeros, lens, lens, torch.full_like(lens, -1), int(lens.sum()))
    start = 0
    for i, n in enumerate(lens.tolist()):
        r.r2t[i, :n] = locs[start:start + n].to(torch.int32)
        start += n
    return locs


@pytest.mark.parametrize("kvp,tpa", [(2, 1), (2, 2)])
def test_tree_verify_accept_draft_steps_and_moves(kvp, tpa):
    """1-3 equal dense attention (KVP 2 x TPA 1 and 2); 4 (KVP 2, each pool kind): every rank's
    rows equal the unsharded move's, and every rank holds some of them."""
    for errs, moves in run_ranks(_rank_main, kvp * tpa, (kvp, tpa), timeout=200):
        assert max(errs) < 1e-5, errs
        assert all(bad == 0 and owned > 0 for bad, owned in moves), moves


# ---------------------------------------------------------------- 4. the pools' move

MOVES = [("mha", False), ("mha", True), ("mla", False)]  # pool kind, fp8 pages


def _move(rank, world, kind, fp8):
    """A random move (targets distinct, sources anywhere) on this rank's pool of `kind`: (bytes
    differing from the unsharded move's result, rows this rank holds)."""
    from sglang_helix.comm import create_kvp_groups
    from sglang_helix.srt.memory.pools import HelixMHATokenToKVPool, HelixMLATokenToKVPool

    cfg = HelixConfig(kvp=world, tpa=1, num_heads=4, num_kv_heads=1 if kind == "mla" else 2, page_size=P,
                      mla=kind == "mla")
    dtype = torch.float8_e4m3fn if fp8 else torch.float32
    common = dict(dtype=dtype, layer_num=2, device="cpu", enable_memory_saver=False, kvp=world, kvp_rank=rank)
    pool = (HelixMLATokenToKVPool(128, P, kv_lora_rank=6, qk_rope_head_dim=2, **common) if kind == "mla" else
            HelixMHATokenToKVPool(128, P, head_num=2, head_dim=3, v_head_dim=5, **common))
    pool._kvp_group = create_kvp_groups(cfg, rank)
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(1, 1 + 128 // P // world) * world  # every page id of every colour
    locs = ((ids[:, None] + torch.arange(world)).reshape(-1)[:, None] * P + torch.arange(P)).reshape(-1)
    glob = [torch.randint(0, 120, (int(locs.max()) + 1, *buf.shape[1:]), generator=g, dtype=torch.uint8)
            for buf in pool._kv_buffers()]  # the unsharded pool's rows (small ints: exact in any dtype)
    rows, owned = pool.local_rows(locs)
    for buf, full in zip(pool._kv_buffers(), glob):
        buf[rows[owned]] = _as(buf, full[locs[owned]])
    perm = torch.randperm(locs.numel(), generator=g)
    tgt, src = locs[perm[:20]], locs[torch.randint(0, locs.numel(), (20,), generator=g)]
    pool.move_kv_cache(tgt, src)
    bad = 0
    for buf, full in zip(pool._kv_buffers(), glob):
        want = full.clone()
        want[tgt] = full[src]
        bad += int((buf[rows[owned]].view(torch.uint8) != _as(buf, want[locs[owned]]).view(torch.uint8)).sum())
    return bad, int(owned.sum())


def _as(buf, x):
    """Rows x (uint8) as the buffer stores them: fp8 pages are uint8 storage, others cast."""
    return x.to(buf.dtype)
