"""The helix backends' CUDA-graph hooks (SGLang 0.5.23's decode graph runner contract), on CPU.

SGLang captures a decode batch as: init_cuda_graph_state(max_bs) once, then per capture / replay
init_forward_metadata_out_graph(fb) outside the graph, init_forward_metadata_in_graph(fb) and the
layers inside it. Here the MLA and GQA backends (KVP 1: no process group needed) go through that
sequence at a padded graph batch (padded rows: seq_len = the fill value, request 0) with the
layers under dev.syncs.no_host_sync(), and must give the real rows' eager outputs exactly.
Both backends resolve their kernel path once, when built; their decode and extend layers never
resolve one again.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from helpers import NEEDS_SGLANG, fake_runner
import torch

pytestmark = NEEDS_SGLANG

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_helix.srt.backends.base import GRAPH_SEQ_LEN_FILL, decode_graphs
    from sglang_helix.srt.backends.gqa import HelixGQABackend
    from sglang_helix.srt.backends.mla import HelixMLABackend
    from sglang_helix.srt.memory.pools import HelixMHATokenToKVPool, HelixMLATokenToKVPool


from sglang_helix import kernel_path
from sglang_helix.config import HelixConfig, HelixConfigError
from sglang_helix.dev.syncs import no_host_sync

P, H, R, DR, K, D = 4, 4, 8, 4, 2, 6
LENS = [9, 3, 14]
CTX = 32


def _runner(mla: bool):
    cfg = HelixConfig(kvp=1, tpa=1, num_heads=H, num_kv_heads=1 if mla else K, mla=mla, page_size=P)
    common = dict(dtype=torch.float32, layer_num=1, device="cpu", enable_memory_saver=False, kvp=1,
                  kvp_rank=0)
    if mla:
        pool = HelixMLATokenToKVPool(256, P, kv_lora_rank=R, qk_rope_head_dim=DR, **common)
    else:
        pool = HelixMHATokenToKVPool(256, P, head_num=K, head_dim=D, v_head_dim=D, **common)
    r2t = torch.zeros(4, CTX, dtype=torch.int32)
    for i, n in enumerate(LENS):  # request i's tokens on pages 1 + 8i, 2 + 8i, ... (slot 0: padding)
        r2t[i, :n] = torch.arange(n, dtype=torch.int32) + (1 + 8 * i) * P
    return fake_runner(cfg, pool, r2t, context_len=CTX, kv_lora_rank=R if mla else None)


def _batch(lens, req):
    lens = torch.tensor(lens)
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens=lens,
                           req_pool_indices=torch.tensor(req), out_cache_loc=torch.zeros(len(lens), dtype=torch.int64))


def _inputs(mla: bool, rows: int):
    g = torch.Generator().manual_seed(5)
    width = R + DR if mla else D
    q = torch.randn(rows, H * width, generator=g)
    k = torch.randn(rows, 1 if mla else K, width, generator=g)
    v = k[..., :R] if mla else torch.randn(rows, K, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_graph_hooks_replay_padded_batch_exactly(mla):
    runner = _runner(mla)
    cls = HelixMLABackend if mla else HelixGQABackend
    backend = cls(runner, rank=0, kvp_group=None, impl="torch")
    pool = runner.token_to_kv_pool
    g = torch.Generator().manual_seed(3)
    for view in (pool.get_paged_kv(0),) if mla else pool.get_paged_kv(0):  # random cached KV
        view.copy_(torch.randn(view.shape, generator=g))
    layer = SimpleNamespace(layer_id=0, scaling=0.4)

    backend.init_cuda_graph_state(4, 4)
    assert backend.get_cuda_graph_seq_len_fill_value() == GRAPH_SEQ_LEN_FILL
    q, k, v = _inputs(mla, 4)
    eager_fb = _batch(LENS, [0, 1, 2])
    backend.init_forward_metadata(eager_fb)
    eager = backend.forward_decode(q[:3], k[:3], v[:3], layer, eager_fb, save_kv_cache=False)

    graph_fb = _batch(LENS + [GRAPH_SEQ_LEN_FILL], [0, 1, 2, 0])  # padded to the graph's batch
    backend.init_forward_metadata_out_graph(graph_fb, in_capture=True)
    with no_host_sync():
        backend.init_forward_metadata_in_graph(graph_fb)
        replayed = backend.forward_decode(q, k, v, layer, graph_fb, save_kv_cache=False)
    torch.testing.assert_close(replayed[:3], eager, atol=0, rtol=0)


def test_graph_batch_larger_than_the_buffers_is_refused():
    backend = HelixMLABackend(_runner(True), rank=0, kvp_group=None, impl="torch")
    with pytest.raises(HelixConfigError, match="--cuda-graph-max-bs"):
        backend.init_cuda_graph_state(5, 5)  # the request pool (and so the buffers) holds 4


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_kernels_resolved_once_when_built(monkeypatch, mla):
    calls = []
    for owner, name in ((kernel_path.KernelPath, "__post_init__"), (kernel_path, "resolve_merge"),
                        (kernel_path, "resolve_extend")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    runner = _runner(mla)
    backend = (HelixMLABackend if mla else HelixGQABackend)(runner, rank=0, kvp_group=None)  # impl "auto"
    assert calls == ["resolve_merge", "resolve_extend", "__post_init__"]
    assert backend.kernels.describe() == "decode=torch merge=torch extend=torch (impl='auto')"
    assert backend.helix.kernels is backend.kernels and backend.kernels.mla == mla
    calls.clear()
    layer = SimpleNamespace(layer_id=0, scaling=0.4)
    q, k, v = _inputs(mla, 3)
    for _ in range(2):  # two steps of two layers each: decode, then an extend of 2 + 1 tokens
        decode = _batch(LENS, [0, 1, 2])
        backend.init_forward_metadata(decode)
        for _layer in range(2):
            backend.forward_decode(q, k, v, layer, decode, save_kv_cache=False)
        extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_seq_lens_cpu=[2, 1],
                                 extend_prefix_lens_cpu=[0, 0], req_pool_indices=torch.tensor([0, 1]))
        backend.init_forward_metadata(extend)
        for _layer in range(2):
            backend.forward_extend(q, k, v, layer, extend, save_kv_cache=False)
    assert calls == []


def test_decode_graphs_as_the_kernel_path_sees_them():
    """CPU: never. CUDA: SGLang's published decode graph config; not published (as here) counts as
    on, so a backend built then keeps a capturable (Triton) decode kernel."""
    assert not decode_graphs("cpu")
    assert decode_graphs("cuda")
