"""The CPU-engine EAGLE / NEXTN ops (sglang_helix.srt.cpu.eagle_fix) against SGLang's own Triton
kernels of the same semantics, run by the Triton interpreter (TRITON_INTERPRET=1, a subprocess):
exact equality of every output (tree links, positions, masks in both layouts, slots, bonus tokens)
on draft trees made by SGLang's own `select_top_k_tokens` + `organize_draft_results` from random
draft scores (top-k 1, 2, 3; 1 to 3 steps), and on batches with ragged lengths. Plus the CPU hooks
(set_embed_and_head without CUDA, the torch_native draft-extend backend, the multi-step refusal)
and where the plugin installs them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang_helix.srt.cpu import eagle_fix

# (topk, steps, num_draft_tokens): chains (topk 1) and trees
TREE_CASES = [(1, 1, 2), (1, 3, 4), (2, 2, 4), (2, 3, 6), (3, 2, 5), (3, 3, 8)]
SEQ_LENS = [5, 9, 1]

# Runs in a fresh interpreter with TRITON_INTERPRET=1: builds each case's inputs with SGLang's own
# EAGLE helpers, runs SGLang's Triton kernels, saves inputs and outputs.
_TRITON_SCRIPT = r"""
import os, sys, torch
from sglang_helix.srt.cpu import sgl_kernel_stub
sgl_kernel_stub.install()
from sglang.srt.speculative.spec_utils import select_top_k_tokens
from sglang.srt.speculative.eagle_utils import organize_draft_results
from sglang.kernels.ops.speculative.spec_tree import sgl_build_tree_kernel_triton, TreeMaskMode
from sglang.kernels.ops.speculative.cache_locs import assign_draft_cache_locs_contiguous
from sglang.kernels.ops.speculative.eagle import fill_bonus_tokens
cases, seq_lens, out_path = eval(sys.argv[1]), eval(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
bs, hidden, vocab = len(seq_lens), 4, 50
results = []
for topk, steps, n in cases:
    scores = hs = None
    s_list, t_list, p_list = [], [], []
    topk_p = torch.rand(bs, topk, generator=g).softmax(-1)
    topk_index = torch.randint(0, vocab, (bs, topk), generator=g)
    hs = torch.randn(bs, hidden, generator=g)
    for i in range(steps):
        _, hs, scores, info = select_top_k_tokens(i, topk_p, topk_index, hs, scores, topk)
        s_list.append(info[0]); t_list.append(info[1]); p_list.append(info[2])
        topk_p = torch.rand(bs * topk, topk, generator=g).softmax(-1)
        topk_index = torch.randint(0, vocab, (bs * topk, topk), generator=g)
    parent_list, top_scores_index, _ = organize_draft_results(s_list, t_list, p_list, n)
    seq = torch.tensor(seq_lens)
    for mode in (TreeMaskMode.FULL_MASK, TreeMaskMode.QLEN_ONLY):
        size = (int(seq.sum()) * n + n * n * bs) if mode == TreeMaskMode.FULL_MASK else n * n * bs
        mask = torch.full((size,), True)
        pos = torch.empty(bs * n, dtype=torch.long)
        links = torch.full((3, bs, n), -1, dtype=torch.long)
        inputs = (parent_list.clone(), top_scores_index.clone(), seq.clone())
        sgl_build_tree_kernel_triton(parent_list, top_scores_index, seq, mask, pos, links[0], links[1],
                                     links[2], topk, steps, n, mode)
        results.append(dict(case=(topk, steps, n, int(mode)), inputs=inputs, mask=mask, pos=pos, links=links))
pool_len = 32
req_to_token = torch.randperm(8 * pool_len, generator=g).view(8, pool_len).to(torch.int32)
rpi, seq = torch.tensor([5, 0, 3]), torch.tensor([7, 1, 20])
locs = {}
for topk, cols in ((1, 1), (1, 3), (2, 3)):
    out = torch.full((bs * topk * cols + 4,), -7, dtype=torch.int64)
    assign_draft_cache_locs_contiguous[(bs,)](rpi, req_to_token, seq, out, pool_len, topk, cols, BS=bs)
    locs[(topk, cols)] = out
accept = torch.randint(0, vocab, (bs, 4), generator=g)
lens = torch.tensor([1, 4, 2])
bonus = torch.full((bs + 2,), -1, dtype=torch.int64)
fill_bonus_tokens[(bs,)](accept, lens, bonus, 4)
torch.save(dict(trees=results, req_to_token=req_to_token, rpi=rpi, seq=seq, locs=locs,
                accept=accept, lens=lens, bonus=bonus), out_path)
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle") / "triton.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "SGLANG_USE_CPU_ENGINE": "1"}
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, repr(TREE_CASES), repr(SEQ_LENS), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


def test_build_tree_equals_sglang_triton_kernel(triton_results):
    trees = triton_results["trees"]
    assert len(trees) == 2 * len(TREE_CASES)
    assert any((ref["links"][2] != -1).any() for ref in trees)  # real trees: siblings exist
    for ref in trees:
        topk, steps, n, mode = ref["case"]
        parent_list, top_scores_index, seq = ref["inputs"]
        mask = torch.full_like(ref["mask"], True)
        pos = torch.empty_like(ref["pos"])
        links = torch.full_like(ref["links"], -1)
        eagle_fix.build_tree_kernel_efficient_cpu(parent_list, top_scores_index, seq, mask, pos, links[0],
                                                  links[1], links[2], topk, steps, n, mode)
        for name, got in (("mask", mask), ("pos", pos), ("links", links)):
            torch.testing.assert_close(got, ref[name], atol=0, rtol=0, msg=f"{name} of {ref['case']}")
        if topk == 1:  # a chain: each draft the child of the one before, no siblings
            chain = torch.tensor([*range(1, n), -1])
            assert (links[1] == chain).all() and (links[2] == -1).all()


def test_draft_cache_locs_and_bonus_tokens_equal_sglang_triton_kernels(triton_results):
    r = triton_results
    for (topk, cols), want in r["locs"].items():
        got = torch.full_like(want, -7)
        eagle_fix.assign_draft_cache_locs_contiguous_cpu(r["rpi"], r["req_to_token"], r["seq"], got,
                                                         r["req_to_token"].shape[1], topk, cols)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    bonus = torch.full_like(r["bonus"], -1)
    eagle_fix.fill_bonus_tokens_cpu(r["accept"], r["lens"], bonus, 4)
    torch.testing.assert_close(bonus, r["bonus"], atol=0, rtol=0)


def test_set_embed_and_head_on_cpu_skips_cuda():
    embed, head = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    model = SimpleNamespace(model=torch.nn.Module(), lm_head=torch.nn.Module())
    model.model.embed_tokens = torch.nn.Embedding(6, 4)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(6, 4))

    def original(*_):
        raise AssertionError("SGLang's version calls torch.cuda.synchronize")

    eagle_fix._around_set_embed_and_head(original, model, embed, head)
    assert model.model.embed_tokens.weight is embed and model.lm_head.weight is head


def _factory(backend, steps=1, topk=1):
    return SimpleNamespace(draft_attn_backend=backend, speculative_num_steps=steps, topk=topk,
                           draft_model_runner=SimpleNamespace())


def test_draft_backends_torch_native_only(monkeypatch):
    called = []

    def original(factory):
        called.append(factory)
        return "sglang's"

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    other = _factory("triton", steps=3)
    assert eagle_fix.draft_extend_backend(original, other) == "sglang's"
    assert eagle_fix.draft_decode_backend(original, other) == "sglang's"
    assert eagle_fix.draft_decode_backend(original, _factory("torch_native", 1)) == "sglang's"
    assert len(called) == 3
    made = []
    monkeypatch.setattr(eagle_fix, "_torch_native_step_class", lambda: lambda runner, step, topk, steps:
                        made.append((step, topk, steps)) or SimpleNamespace(step=step))
    multi = eagle_fix.draft_decode_backend(original, _factory("torch_native", 3))
    assert isinstance(multi, eagle_fix.TorchNativeMultiStepDraftBackend) and made == [(0, 1, 3), (1, 1, 3)]
    assert [b.step for b in multi.attn_backends] == [0, 1] and len(called) == 3
    tree = eagle_fix.draft_decode_backend(original, _factory("torch_native", 3, topk=2))  # trees too
    assert isinstance(tree, eagle_fix.TorchNativeMultiStepDraftBackend) and made[2:] == [(0, 2, 3), (1, 2, 3)]


def test_torch_native_draft_step_attends_committed_plus_step_plus_one(monkeypatch):
    """Step s of a chain draft decodes over seq_lens + s + 1 tokens (SGLang's torch_native decode
    reads forward_batch.seq_lens; the batch itself keeps the committed lengths)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    seen = []
    monkeypatch.setattr(TorchNativeAttnBackend, "__init__", lambda self, runner: None)
    monkeypatch.setattr(TorchNativeAttnBackend, "forward_decode",
                        lambda self, q, k, v, layer, fb, save_kv_cache=True, **kw: seen.append(fb.seq_lens.tolist()))
    step = eagle_fix._torch_native_step_class()(SimpleNamespace(page_size=4), 2)
    batch = SimpleNamespace(seq_lens=torch.tensor([5, 9]))
    step.forward_decode(None, None, None, None, batch)
    assert seen == [[8, 12]] and batch.seq_lens.tolist() == [5, 9]


def test_draft_backends_are_sglangs_off_the_cpu_engine(monkeypatch):
    """The draft factory rows are installed everywhere (srt.spec owns them for Helix); off the CPU
    engine the fix hands torch_native back to SGLang's factory (which refuses it itself)."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")
    original = lambda factory: "sglang's"  # noqa: E731
    assert eagle_fix.draft_extend_backend(original, _factory("torch_native")) == "sglang's"
    assert eagle_fix.draft_decode_backend(original, _factory("torch_native", 3)) == "sglang's"


def test_helix_off_draft_factory_hooks_hand_over_to_this_fix(monkeypatch):
    """srt.spec's draft factory hooks, Helix off: the CPU fix's torch_native backends."""
    from sglang_helix.srt import spec

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setattr(eagle_fix, "_torch_native_step_class",
                        lambda: lambda runner, step, topk, steps: SimpleNamespace(step=step))
    factory = _factory("torch_native", 3)
    factory.draft_model_runner = SimpleNamespace(server_args=SimpleNamespace())  # no HelixConfig
    multi = spec._around_draft_decode_backend(lambda f: "sglang's", factory)
    assert isinstance(multi, eagle_fix.TorchNativeMultiStepDraftBackend)


def test_hooks_are_cpu_engine_only():
    from sglang_helix.srt.hook_table import installed_rows, rows_of_fix

    rows = rows_of_fix("eagle")
    shared = {r.target.rsplit(".", 1)[1] for r in rows if not r.cpu_only}
    assert shared == {"_handle_eagle_family", "create_draft_extend_backend", "create_decode_backend"}
    assert all(r.owner == "spec" for r in rows if not r.cpu_only)
    cpu_rows = [r for r in rows if r.cpu_only]
    assert len(cpu_rows) == 4 and all(r.owner == "cpu.eagle_fix" for r in cpu_rows)
    assert not set(cpu_rows) & set(installed_rows(False))
    assert set(cpu_rows) <= set(installed_rows(True, {"SGLANG_USE_CPU_ENGINE": "1"}))


SGLANG_CALLS = """
import torch
from sglang.kernels.ops.speculative.eagle import fill_bonus_tokens_func
from sglang.kernels.ops.speculative.cache_locs import assign_draft_cache_locs_contiguous_func
bonus = torch.full((2,), -1)
fill_bonus_tokens_func(torch.tensor([[3, 4], [5, 6]]), torch.tensor([2, 1]), bonus, 2, 2)
assert bonus.tolist() == [4, 5]
out = torch.zeros(2, dtype=torch.int64)
assign_draft_cache_locs_contiguous_func(torch.tensor([1]), torch.arange(8).view(2, 4), torch.tensor([1]), out, 1, 2)
assert out.tolist() == [5, 6]
"""


SGLANG_CHECKS = {"eagle: SGLang's dispatchers run the torch ops": SGLANG_CALLS}


def test_hooks_apply_and_sglang_dispatchers_run_the_torch_ops(sglang_checks):
    sglang_checks.assert_ok("eagle: SGLang's dispatchers run the torch ops")
