"""The CPU-engine native-MoE fix (sglang_helix.srt.cpu.moe_fix) against a dense per-expert reference.

- SGLang 0.5.23's own `moe_forward_native` dies on EP's -1 expert ids and on 0 tokens (pinned);
- through the hook, each EP rank's output is its local experts' share (fp32 vs an fp64 reference,
  rtol 1e-5; ids -1 add exactly nothing, whatever their weights), and the ranks' outputs summed
  (SGLang's all-reduce) equal the dense MoE of every expert; with no -1 id the hook calls SGLang's
  function unchanged (bit for bit);
- where the hook is installed (CPU engine, opt-out) and that it applies to SGLang's live target:
  tests/srt/test_hook_table.py, for every row of the hook table.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher.standard import _map_topk_ids_to_local_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from sglang_helix.srt.cpu import moe_fix

E, TOP_K, HID, INTER = 4, 2, 16, 8  # the tiny MLA model's routed experts and top-k


def _config(**kw):
    values = dict(apply_router_weight_on_input=False, activation="silu", gemm1_alpha=None,
                  gemm1_clamp_limit=None)
    return SimpleNamespace(**{**values, **kw})


def _weights(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, HID, generator=g) / HID ** 0.5
    w2 = torch.randn(E, HID, INTER, generator=g) / INTER ** 0.5
    return w13.to(dtype), w2.to(dtype)


def _routing(tokens, seed=1):
    """Distinct top-k expert ids per token and normalized positive weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, TOP_K, generator=g) + 0.1
    return ids, weights / weights.sum(-1, keepdim=True)


def _rank_layer(w13, w2, ep_rank, ep_size):
    """What FusedMoE holds on one EP rank: its contiguous slice of experts (num_experts global)."""
    local = E // ep_size
    part = slice(ep_rank * local, (ep_rank + 1) * local)
    return SimpleNamespace(num_experts=E, w13_weight=w13[part].contiguous(),
                           w2_weight=w2[part].contiguous())


def _local_ids(ids, ep_rank, ep_size):
    """SGLang's StandardDispatcher mapping: global id -> local id on this rank, else -1."""
    local = E // ep_size
    mapping = torch.full((E,), -1, dtype=torch.int32)
    mapping[ep_rank * local:(ep_rank + 1) * local] = torch.arange(local, dtype=torch.int32)
    return _map_topk_ids_to_local_experts(ids, mapping)


def _dense_reference(x, ids, weights, w13, w2, experts=range(E)):
    """fp64: sum over the top-k slots routed to `experts` of weight * expert(x)."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in experts:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += float(weights[t, k]) * (w2[e] @ (F.silu(gate) * up))
    return out


def _hooked(layer, x, ids, weights, config=None):
    topk = StandardTopKOutput(topk_weights=weights, topk_ids=ids, router_logits=None)
    return moe_fix._around_moe_forward_native(moe_forward_native, layer, x, topk,
                                              config or _config())


def _x(tokens, seed=2, dtype=torch.float32):
    return torch.randn(tokens, HID, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- SGLang's bug, pinned


def test_sglang_native_moe_dies_on_ep_ids_and_on_empty_batches():
    w13, w2 = _weights()
    ids, weights = _routing(6)
    layer = _rank_layer(w13, w2, 0, 2)
    topk = StandardTopKOutput(weights, _local_ids(ids, 0, 2), None)
    with pytest.raises((RuntimeError, IndexError), match="out of bounds"):
        moe_forward_native(layer, _x(6), topk, _config())
    empty = StandardTopKOutput(weights[:0], ids[:0], None)
    with pytest.raises(RuntimeError, match="0 elements"):
        moe_forward_native(_rank_layer(w13, w2, 0, 1), _x(0), empty, _config())


# ----------------------------------------------------------------------------- the fix


@pytest.mark.parametrize("ep_size", [2, 4])
def test_each_rank_gives_its_experts_share_and_the_ranks_sum_to_the_dense_moe(ep_size):
    w13, w2 = _weights()
    x = _x(9)
    ids, weights = _routing(9)
    local = E // ep_size
    total = torch.zeros(9, HID, dtype=torch.float64)
    for rank in range(ep_size):
        out = _hooked(_rank_layer(w13, w2, rank, ep_size), x, _local_ids(ids, rank, ep_size),
                      weights)
        assert out.shape == (9, HID) and out.dtype == x.dtype
        mine = range(rank * local, (rank + 1) * local)
        torch.testing.assert_close(out.double(), _dense_reference(x, ids, weights, w13, w2, mine),
                                   rtol=1e-5, atol=1e-6)
        total += out.double()
    dense = _dense_reference(x, ids, weights, w13, w2)
    torch.testing.assert_close(total, dense, rtol=1e-5, atol=1e-6)
    assert dense.abs().min() > 0  # every token got a non-zero MoE output


def test_minus_one_slots_contribute_nothing_whatever_their_weight():
    w13, w2 = _weights()
    x = _x(8)
    ids, weights = _routing(8)
    layer, local_ids = _rank_layer(w13, w2, 1, 2), _local_ids(ids, 1, 2)
    dropped = local_ids < 0
    assert dropped.any() and (~dropped).any()
    out = _hooked(layer, x, local_ids, weights)
    poisoned = weights.masked_fill(dropped, float("nan"))  # no -1 slot's weight is ever read
    assert torch.equal(_hooked(layer, x, local_ids, poisoned), out)
    nothing_here = dropped.all(dim=1)
    if nothing_here.any():
        assert torch.equal(out[nothing_here], torch.zeros_like(out[nothing_here]))
    # a batch routed entirely to the other rank: exact zeros of the right shape
    none = torch.full_like(local_ids, -1)
    assert torch.equal(_hooked(layer, x, none, weights), torch.zeros(8, HID))


def test_no_minus_one_calls_sglang_unchanged_bit_for_bit():
    w13, w2 = _weights()
    x = _x(7)
    ids, weights = _routing(7)
    layer = _rank_layer(w13, w2, 0, 1)
    topk = StandardTopKOutput(weights, ids, None)
    assert torch.equal(_hooked(layer, x, ids, weights), moe_forward_native(layer, x, topk, _config()))


def test_bf16_activations_match_the_reference():
    w13, w2 = _weights(dtype=torch.bfloat16)
    x = _x(6, dtype=torch.bfloat16)
    ids, weights = _routing(6)
    total = sum(_hooked(_rank_layer(w13, w2, r, 2), x, _local_ids(ids, r, 2), weights).double()
                for r in range(2))
    torch.testing.assert_close(total, _dense_reference(x, ids, weights, w13, w2),
                               rtol=2e-2, atol=2e-2)


def test_empty_batch_gives_an_empty_output():
    w13, w2 = _weights()
    ids, weights = _routing(3)
    for ep_size in (1, 2):
        out = _hooked(_rank_layer(w13, w2, 0, ep_size), _x(0), ids[:0], weights[:0])
        assert out.shape == (0, HID) and out.dtype == torch.float32
