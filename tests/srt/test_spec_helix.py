"""Helix on + NGRAM: the drafter's chain masks (srt.spec) and the helix backend's verify plan
(srt.backends.spec_plans: TARGET_VERIFY planned as an extend over the committed tokens, causal
for chains); Helix on + NEXTN / EAGLE / EAGLE-3: the draft runner's extend backend and its
multi-step draft backends, chains and trees (srt.spec); SGLang's page-tree refusal (srt.spec)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sglang_helix.config import HelixConfigError
from sglang_helix.srt import spec
from sglang_helix.spec_tree import is_chain, tree_masks
from sglang_helix.srt.cpu import sgl_kernel_stub
from sglang_helix.srt.cpu.spec_fix import reconstruct_indices_from_tree_mask

sgl_kernel_stub.install()  # the modules under test import SGLang's (CPU-engine) kernels


def ngram_mask(prevs_per_req, n):
    """SGLang's fillResult mask from parent lists (prev -1: root; padding nodes have prev 0)."""
    out = []
    for prevs in prevs_per_req:
        m = np.zeros((n, n), dtype=np.uint8)
        for i, p in enumerate(prevs):
            if p != -1:
                m[i, : p + 1] = m[p, : p + 1]
            m[i, i] = 1
        out.append(m)
    return np.stack(out).reshape(-1)


def links(mask, bs, n):
    t = lambda *s: torch.empty(*s, dtype=torch.int64)
    pos, idx, nxt, sib = t(bs * n), t(bs, n), t(bs, n), t(bs, n)
    reconstruct_indices_from_tree_mask(torch.from_numpy(mask.astype(bool)), torch.tensor([5] * bs),
                                       pos, idx, nxt, sib, bs, n)
    return pos, nxt, sib


def test_chain_mask_turns_padding_siblings_into_a_chain():
    n = 4
    # request 0: one real draft, two padding nodes under the root; request 1: a full chain
    mask = ngram_mask([[-1, 0, 0, 0], [-1, 0, 1, 2]], n)
    assert not is_chain(tree_masks(torch.from_numpy(mask), [5, 5], n))
    chain = spec.chain_mask(mask, n)
    assert chain.dtype == mask.dtype and chain.shape == mask.shape
    assert np.array_equal(chain.reshape(2, n, n)[1], mask.reshape(2, n, n)[1])  # chains unchanged
    assert is_chain(tree_masks(torch.from_numpy(chain), [5, 5], n))  # verified causally
    pos, nxt, sib = links(chain, 2, n)
    assert (sib == -1).all() and nxt.tolist() == [[1, 2, 3, -1]] * 2
    assert pos.tolist() == [5, 6, 7, 8] * 2  # draft i at position seq_len + i


def test_batch_get_hook_only_with_helix(monkeypatch):
    n, mask = 2, ngram_mask([[-1, 0]], 2)
    corpus = SimpleNamespace(draft_token_num=n)
    orig = lambda c, ids, tokens, lens: ("drafts", mask)
    assert spec._around_batch_get(orig, corpus, ["r"], [[1]], [1])[1] is mask  # Helix off: unchanged
    monkeypatch.setattr(spec.state, "current_config", lambda: object())
    drafts, got = spec._around_batch_get(orig, corpus, ["r"], [[1]], [1])
    assert drafts == "drafts" and np.array_equal(got, np.tril(np.ones((2, 2), np.uint8)).reshape(-1))


def test_chain_mask_refuses_a_bad_layout():
    with pytest.raises(ValueError, match=r"not \[B, 3, 3\]"):
        spec.chain_mask(np.ones(10, dtype=np.uint8), 3)


def test_speculative_counts_add_the_open_log_interval():
    """/server_info's helix.spec: SGLang's lifetime totals + the interval it has not logged yet."""
    from sglang_helix.srt.info import speculative_counts

    algo = lambda none: SimpleNamespace(is_none=lambda: none)  # noqa: E731
    reporter = SimpleNamespace(spec_total_num_forward_ct=40, spec_num_forward_ct=10,
                               spec_total_num_accept_tokens=60, spec_num_accept_tokens=40)
    got = speculative_counts(SimpleNamespace(spec_algorithm=algo(False), metrics_reporter=reporter))
    assert got == {"verify_steps": 50, "accept_tokens": 100, "avg_accept_length": 2.0}
    fresh = SimpleNamespace(spec_total_num_forward_ct=0, spec_num_forward_ct=0,
                            spec_total_num_accept_tokens=0, spec_num_accept_tokens=0)
    assert speculative_counts(SimpleNamespace(spec_algorithm=algo(False), metrics_reporter=fresh)) == {
        "verify_steps": 0, "accept_tokens": 0, "avg_accept_length": None}
    assert speculative_counts(SimpleNamespace(spec_algorithm=algo(True), metrics_reporter=reporter)) is None
    assert speculative_counts(None) is None


def test_nextn_draft_extend_backend_is_helix_under_helix(monkeypatch):
    """NEXTN: Helix off (GPU) -> SGLang's factory; Helix on -> a helix backend of the draft runner (its
    own Helix pool); another draft backend by name is refused with its flag."""
    from sglang_helix.config import HelixConfig
    from sglang_helix.srt.backends import factory as backend_factory
    from sglang_helix.srt.state import CONFIG_ATTR

    made = []
    monkeypatch.setattr(backend_factory, "create_helix_backend",
                        lambda runner: made.append(runner) or SimpleNamespace())

    def original(factory):
        return "sglang's"

    off = SimpleNamespace(draft_attn_backend=None, draft_model_runner=SimpleNamespace(server_args=SimpleNamespace()))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")  # Helix off on the CPU engine: tests/srt/test_eagle_fix.py
    assert spec._around_draft_extend_backend(original, off) == "sglang's" and not made
    cfg = HelixConfig(kvp=2, tpa=1, num_heads=4, num_kv_heads=1, mla=True, page_size=4)
    runner = SimpleNamespace(server_args=SimpleNamespace(**{CONFIG_ATTR: cfg}))
    for name in (None, "helix"):
        backend = spec._around_draft_extend_backend(original, SimpleNamespace(draft_attn_backend=name,
                                                                              draft_model_runner=runner))
        assert backend.prefill_attention_backend_str == backend.decode_attention_backend_str == "helix"
    assert made == [runner, runner]
    with pytest.raises(HelixConfigError, match="--speculative-draft-attention-backend triton"):
        spec._around_draft_extend_backend(original, SimpleNamespace(draft_attn_backend="triton",
                                                                    draft_model_runner=runner))


def test_helix_multi_step_draft_plans_each_step_at_its_length(monkeypatch):
    """Step s of a chain MTP draft attends seq_lens + s + 1, also when SGLang re-plans the step
    backend itself (its runner calls init_forward_metadata again): the offset lives on the
    backend, not in the multi-step wrapper's call."""
    from sglang_helix.srt.backends.base import BACKEND_NAME, HelixBackendBase

    assert spec.HELIX_BACKEND == BACKEND_NAME
    planned = []

    class Step:
        decode_len_offset, draft_tree = 0, None

        def init_forward_metadata(self, fb):  # the base's decode plan, with a recording kernel plan
            HelixBackendBase._plan_decode(self, fb)

        def _local_tables(self, fb, lens):
            return None, None

        helix = SimpleNamespace(plan=lambda lens, table: planned.append(lens.tolist()))

    made = []
    monkeypatch.setattr(spec, "_draft_backend",
                        lambda runner, draft_tree=None: made.append(draft_tree) or Step())
    multi = spec.HelixMultiStepDraftBackend(object(), topk=1, num_steps=4)
    assert [b.decode_len_offset for b in multi.attn_backends] == [1, 2, 3] and made == [None] * 3
    fb = SimpleNamespace(seq_lens=torch.tensor([5, 9]))
    multi.init_forward_metadata(fb)
    multi.attn_backends[1].init_forward_metadata(fb)  # a re-plan of step 1 alone
    assert planned == [[6, 10], [7, 11], [8, 12], [7, 11]]
    made.clear()
    tree = spec.HelixMultiStepDraftBackend(object(), topk=2, num_steps=3)  # a tree: one step each
    assert [(t.step, t.topk, t.num_steps) for t in made] == [(0, 2, 3), (1, 2, 3)]
    assert [b.decode_len_offset for b in tree.attn_backends] == [0, 0]


def test_page_tree_refusal_stepped_over_only_where_served(monkeypatch):
    """SGLang's last EAGLE-family check refuses top-k > 1 at page size > 1 outside flashinfer / fa3 /
    triton: with Helix it is stepped over (the helix backend serves page trees), Helix off on the
    CPU engine with torch_native too (the CPU EAGLE fix's draft steps); any other error stands."""
    from sglang_helix.rules.flags import HelixServerArgs
    from sglang_helix.srt import resolution
    from sglang_helix.srt.cpu import eagle_fix

    refusal = ValueError("speculative_eagle_topk > 1 with page_size > 1 is only supported on "
                         "('flashinfer', 'fa3', 'triton'); got attention_backend='torch_native'.")

    def raising(err):
        def original(server_args):
            raise err
        return original

    on = SimpleNamespace(_helix_args=HelixServerArgs(enable_helix=True))
    spec._around_handle_eagle_family(raising(refusal), on)
    with pytest.raises(ValueError, match="other"):
        spec._around_handle_eagle_family(raising(ValueError("other")), on)
    off = SimpleNamespace()
    monkeypatch.setattr(resolution, "helix_args_of", lambda args: getattr(args, "_helix_args", None))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setattr(eagle_fix, "_resolved_attention_backend", lambda args: "torch_native")
    spec._around_handle_eagle_family(raising(refusal), off)
    monkeypatch.setattr(eagle_fix, "_resolved_attention_backend", lambda args: "intel_amx")
    with pytest.raises(ValueError, match="only supported on"):
        spec._around_handle_eagle_family(raising(refusal), off)
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")
    monkeypatch.setattr(eagle_fix, "_resolved_attention_backend", lambda args: "torch_native")
    with pytest.raises(ValueError, match="only supported on"):
        spec._around_handle_eagle_family(raising(refusal), off)
