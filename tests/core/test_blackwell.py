"""kernels/blackwell.py: the Blackwell MLA path's capability check and its glue, on CPU.

No GPU here, so the flashinfer kernel is replaced by a fake with the exact signature of
flashinfer 0.7.2's trtllm_batch_decode_with_kv_cache_mla. The fake checks what the real Python
dispatcher checks (block-table alignment, dtypes, the DCP defaults), computes the reference
math in the kernel's own layout (packed [B, 1, H, R + Dr] query, 576-wide keys, latent values)
and returns the LSE in the base it was asked for, with garbage in empty rows (as the kernels
do), so the padding, query packing, base conversion and empty-row fix-up are all exercised.
"""

from __future__ import annotations

import functools
import math
import types

import pytest
import torch

from sglang_helix.attention import partial_attention_mla
from sglang_helix.kernels import blackwell
from sglang_helix.kernels.reference import mla_partial_ref

R, DR, SCALE = 512, 64, 0.07


def fake_trtllm_mla(  # signature copied from flashinfer 0.7.2 (flashinfer/mla/_core.py)
    query, kv_cache, workspace_buffer, qk_nope_head_dim, kv_lora_rank, qk_rope_head_dim,
    block_tables, seq_lens, max_seq_len, sparse_mla_top_k=0, out=None, bmm1_scale=1.0,
    bmm2_scale=1.0, sinks=None, skip_softmax_threshold_scale_factor=None, enable_pdl=None,
    backend="auto", is_var_seq=True, uses_shared_paged_kv_idx=True, lse=None, return_lse=False,
    cute_dsl_impl="auto", kv_scale_format="auto", cum_seq_lens_q=None, max_q_len=None,
    multi_ctas_kv_counter_buffer=None, sparse_mla_top_k_lens=None, enable_dcp=False, cp_world=1,
    cp_rank=0, causal_seqlens_kv_global=None, use_fp16_softmax=None, return_lse_base=None,
):
    FakeFlashinfer.calls.append(dict(backend=backend, block_tables=block_tables, max_seq_len=max_seq_len,
                                     counter=multi_ctas_kv_counter_buffer, lse_base=return_lse_base))
    bsz, q_len, heads, width = query.shape
    assert q_len == 1 and width == kv_lora_rank + qk_rope_head_dim and query.is_contiguous()
    assert query.dtype == kv_cache.dtype == torch.bfloat16
    kv = kv_cache if kv_cache.dim() == 3 else kv_cache.squeeze(1)
    page = kv.shape[1]
    assert kv.shape[2] == width and qk_nope_head_dim == 128
    assert backend in ("trtllm-gen", "cute-dsl") and return_lse and not enable_dcp
    assert return_lse_base in ("base2", "basee")
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == bsz
    assert block_tables.shape[1] % (128 // page) == 0, "block_num % (128 / block_size) != 0"
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (bsz,)
    assert isinstance(max_seq_len, int) and max_seq_len >= max(1, int(seq_lens.max()))
    assert isinstance(bmm1_scale, float) and bmm2_scale == 1.0 and sparse_mla_top_k == 0
    assert workspace_buffer.dtype == torch.int8 and not workspace_buffer.any()
    if backend == "trtllm-gen":
        assert multi_ctas_kv_counter_buffer.dtype == torch.uint8
        assert multi_ctas_kv_counter_buffer.numel() >= FakeFlashinfer.counter_bytes(bsz, heads, 4)
    else:
        assert multi_ctas_kv_counter_buffer is None
    res = torch.full((bsz, q_len, heads, kv_lora_rank), float("nan"), dtype=torch.bfloat16)
    lse_out = torch.full((bsz * q_len, heads), float("inf"))  # garbage where a row is empty
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, : -(-n // page)].long()
        keys = kv[pages].reshape(-1, width)[:n].float()  # [n, R + Dr]
        scores = query[b, 0].float() @ keys.T * bmm1_scale  # [H, n]
        lse_e = torch.logsumexp(scores, -1)
        res[b, 0] = (torch.softmax(scores, -1) @ keys[:, :kv_lora_rank]).bfloat16()
        lse_out[b] = lse_e / math.log(2.0) if return_lse_base == "base2" else lse_e
    return res, lse_out


class FakeFlashinfer:
    calls: list = []

    @staticmethod
    def counter_bytes(bsz, heads, sm_count):
        return -(-max(bsz * heads, sm_count) // 8) * 8 * 4

    def __init__(self, kernel=fake_trtllm_mla, cute_dsl=True):
        self.decode = types.SimpleNamespace(trtllm_batch_decode_with_kv_cache_mla=kernel)
        self.utils = types.SimpleNamespace(get_trtllm_gen_multi_ctas_kv_counter_bytes=self.counter_bytes,
                                           get_device_sm_count=lambda device: 4)
        self.cute_dsl = types.SimpleNamespace(availability=types.SimpleNamespace(
            is_cute_dsl_available=lambda: cute_dsl, is_cute_dsl_arch_supported=lambda major, minor: cute_dsl))


@pytest.fixture
def on_blackwell(monkeypatch):
    """Pretend CPU tensors sit on a compute-capability-10.0 GPU with flashinfer 0.7.2 installed."""
    FakeFlashinfer.calls = []
    monkeypatch.setattr(blackwell, "_compute_capability", lambda *tensors: (10, 0))
    monkeypatch.setattr(blackwell, "_flashinfer", lambda: FakeFlashinfer())
    monkeypatch.setattr(blackwell, "WORKSPACE_BYTES", 4096)
    monkeypatch.setattr(blackwell, "_workspaces", {})
    monkeypatch.setattr(blackwell, "_counters", {})
    return monkeypatch


def mla_inputs(bsz=4, heads=4, page=32, max_pages=5, lens=(70, 0, 1, 160), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_pages = bsz * max_pages + 3
    perm = torch.randperm(num_pages, generator=g)[: bsz * max_pages]
    return dict(
        q_latent=torch.randn(bsz, heads, R, generator=g).to(dtype),
        q_rope=torch.randn(bsz, heads, DR, generator=g).to(dtype),
        kv_cache=torch.randn(num_pages, page, R + DR, generator=g).to(dtype),
        page_table=perm.reshape(bsz, max_pages),  # int64, 5 columns: padded for the kernel
        seq_lens=torch.tensor(lens, dtype=torch.int64),
        scale=SCALE,
    )


def kv3(a):
    return a["q_latent"], a["q_rope"], a["kv_cache"]


# ----------------------------------------------------------------------------- on this CPU machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectation")
def test_capability_check_is_false_on_cpu():
    a = mla_inputs()
    for backend in ("auto", "blackwell", "trtllm-gen", "cutedsl_mla"):
        assert not blackwell.blackwell_mla_available(*kv3(a), backend)
    assert blackwell.choose_backend(*kv3(a)) is None
    assert "a CUDA device (got cpu)" in blackwell.unavailable_reason(*kv3(a), "trtllm-gen")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectation")
def test_auto_never_picks_it_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto picked the Blackwell path on CPU")

    monkeypatch.setattr(blackwell, "mla_partial_blackwell", refuse)
    a = mla_inputs()
    out, lse = partial_attention_mla(**a)
    ref_out, ref_lse = partial_attention_mla(**a, impl="torch")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectation")
@pytest.mark.parametrize("impl", blackwell.IMPLS)
def test_explicit_request_on_cpu_names_the_requirement(impl):
    needs = r"cannot run here: (trtllm-gen|cute-dsl) needs a CUDA device \(got cpu\)"
    with pytest.raises(ValueError, match=needs):
        partial_attention_mla(**mla_inputs(), impl=impl)
    with pytest.raises(ValueError, match=r"Use impl='auto'"):
        blackwell.mla_partial_blackwell(**mla_inputs(), backend=impl)


def test_non_blackwell_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(blackwell, "_compute_capability", lambda *tensors: (9, 0))
    monkeypatch.setattr(blackwell, "_flashinfer", lambda: FakeFlashinfer())
    a = mla_inputs()
    assert "compute capability 10.x" in blackwell.unavailable_reason(*kv3(a), "cute-dsl")
    assert "got 9.0" in blackwell.unavailable_reason(*kv3(a), "trtllm-gen")
    with pytest.raises(ValueError, match=r"compute capability 10\.x.*got 9\.0"):
        blackwell.mla_partial_blackwell(**a, backend="trtllm_mla")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"backend='fa3' is unknown; choose one of 'auto'"):
        blackwell.blackwell_mla_available(*kv3(mla_inputs()), "fa3")


# ----------------------------------------------------------------------------- pretending Blackwell


@pytest.mark.parametrize("over,backend,needle", [
    (dict(dtype=torch.float16), "trtllm-gen", "bfloat16"),
    (dict(page=16), "trtllm-gen", "page size 32 or 64"),
    (dict(page=1), "cute-dsl", "dividing 128"),
    (dict(heads=96), "trtllm-gen", "not 64 < H < 128"),
    (dict(heads=130), "cute-dsl", "1 <= H <= 128"),
])
def test_kernel_constraints(on_blackwell, over, backend, needle):
    assert needle in blackwell.unavailable_reason(*kv3(mla_inputs(**over)), backend)


def test_library_requirements(on_blackwell):
    a = mla_inputs()
    assert blackwell.choose_backend(*kv3(a)) == "trtllm-gen"
    on_blackwell.setattr(blackwell, "_flashinfer", lambda: FakeFlashinfer(cute_dsl=False))
    assert "CuTe DSL" in blackwell.unavailable_reason(*kv3(a), "cute-dsl")
    assert blackwell.unavailable_reason(*kv3(a), "trtllm-gen") is None

    def old_kernel(query, kv_cache, workspace_buffer, qk_nope_head_dim, kv_lora_rank, qk_rope_head_dim,
                   block_tables, seq_lens, max_seq_len, return_lse=False):
        raise AssertionError("never called")

    on_blackwell.setattr(blackwell, "_flashinfer", lambda: FakeFlashinfer(kernel=old_kernel))
    assert "return_lse_base" in blackwell.unavailable_reason(*kv3(a), "trtllm-gen")
    on_blackwell.setattr(blackwell, "_flashinfer", lambda: None)
    assert "flashinfer installed" in blackwell.unavailable_reason(*kv3(a), "trtllm-gen")
    assert not blackwell.blackwell_mla_available(*kv3(a))


@pytest.mark.parametrize("impl,page,heads,want", [
    ("trtllm_mla", 32, 4, "trtllm-gen"),
    ("trtllm_mla", 64, 4, "trtllm-gen"),
    ("cutedsl_mla", 32, 4, "cute-dsl"),
    ("cutedsl_mla", 16, 4, "cute-dsl"),
    ("blackwell", 64, 4, "trtllm-gen"),
    ("blackwell", 16, 4, "cute-dsl"),  # trtllm-gen needs 32 or 64
    ("auto", 32, 4, "trtllm-gen"),
    ("auto", 32, 96, "cute-dsl"),  # trtllm-gen refuses 64 < H < 128
])
def test_glue_matches_reference(on_blackwell, impl, page, heads, want):
    max_pages = -(-160 // page) + 1
    a = mla_inputs(page=page, heads=heads, max_pages=max_pages)
    out, lse = partial_attention_mla(**a, impl=impl)
    (call,) = FakeFlashinfer.calls
    assert call["backend"] == want and call["lse_base"] == "base2"
    assert call["block_tables"].shape[1] % (128 // page) == 0 and call["block_tables"].shape[1] >= max_pages
    assert call["max_seq_len"] == max_pages * page  # the table's capacity: no host sync
    assert (call["counter"] is not None) == (want == "trtllm-gen")
    ref_out, ref_lse = mla_partial_ref(**a)
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)  # natural log, converted once
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the empty row: out 0, lse -inf
    assert torch.isneginf(lse[1]).all()


def test_natural_lse_whatever_base_the_kernel_was_asked_for(on_blackwell):
    """A kernel honouring return_lse_base gives natural logs here; one stuck on its historical base
    would be off by a factor ln 2 (the test a missing or doubled conversion fails)."""
    a = mla_inputs()
    _, lse = blackwell.mla_partial_blackwell(**a, backend="cute-dsl")
    _, ref_lse = mla_partial_ref(**a)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)

    @functools.wraps(fake_trtllm_mla)  # keeps the signature, return_lse_base included
    def natural_always(**kwargs):
        return fake_trtllm_mla(**{**kwargs, "return_lse_base": "basee"})

    on_blackwell.setattr(blackwell, "_flashinfer", lambda: FakeFlashinfer(kernel=natural_always))
    _, wrong = blackwell.mla_partial_blackwell(**a, backend="cute-dsl")
    finite = torch.isfinite(ref_lse)
    assert not torch.allclose(wrong[finite], ref_lse[finite], atol=1e-2)


def test_max_seq_len_override_and_empty_batches(on_blackwell):
    a = mla_inputs(lens=(3, 0, 0, 7))
    blackwell.mla_partial_blackwell(**a, max_seq_len=7)
    assert FakeFlashinfer.calls[-1]["max_seq_len"] == 7
    zeros = mla_inputs(lens=(0, 0, 0, 0))
    out, lse = blackwell.mla_partial_blackwell(**zeros)
    assert FakeFlashinfer.calls[-1]["max_seq_len"] == 5 * 32
    assert not out.any() and torch.isneginf(lse).all()
    calls = len(FakeFlashinfer.calls)
    none = mla_inputs(bsz=2, lens=(0, 0))
    none["page_table"] = none["page_table"][:, :0]
    out, lse = blackwell.mla_partial_blackwell(**none)  # zero-width table: no launch at all
    assert out.shape == (2, 4, R) and not out.any() and torch.isneginf(lse).all()
    assert len(FakeFlashinfer.calls) == calls


def test_block_table_for_kernel():
    table = torch.arange(10, dtype=torch.int64).reshape(2, 5)
    padded = blackwell.block_table_for_kernel(table, 32)  # 128 // 32 = 4 -> 8 columns
    assert padded.dtype == torch.int32 and padded.shape == (2, 8) and padded.is_contiguous()
    assert torch.equal(padded[:, :5], table.int()) and not padded[:, 5:].any()
    aligned = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    assert blackwell.block_table_for_kernel(aligned, 64) is aligned  # 2 | 4: no copy
    assert blackwell.block_table_for_kernel(aligned[:, :3], 128).shape == (2, 3)  # 128 // 128 = 1
    strided = torch.arange(16, dtype=torch.int32).reshape(2, 8)[:, ::2]
    assert torch.equal(blackwell.block_table_for_kernel(strided, 32), strided)
