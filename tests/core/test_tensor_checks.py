"""Every input check of sglang_helix.attention (sglang_helix.tensor_checks) raises a clear error
naming the argument."""

from __future__ import annotations

import pytest
import torch

from sglang_helix.attention import merge_partials, partial_attention_gqa, partial_attention_mla

B, HQ, KH, D, DV, P, PAGES, MAXP = 2, 4, 2, 16, 8, 4, 6, 3
H, R, DR = 3, 48, 8


def gqa_args(**over):
    args = dict(
        q=torch.randn(B, HQ, D),
        k_cache=torch.randn(PAGES, P, KH, D),
        v_cache=torch.randn(PAGES, P, KH, DV),
        page_table=torch.arange(B * MAXP, dtype=torch.int32).reshape(B, MAXP),
        seq_lens=torch.tensor([5, 12], dtype=torch.int32),
        scale=0.25,
    )
    args.update(over)
    return args


def mla_args(**over):
    args = dict(
        q_latent=torch.randn(B, H, R),
        q_rope=torch.randn(B, H, DR),
        kv_cache=torch.randn(PAGES, P, R + DR),
        page_table=torch.arange(B * MAXP, dtype=torch.int32).reshape(B, MAXP),
        seq_lens=torch.tensor([5, 12], dtype=torch.int32),
        scale=0.2,
    )
    args.update(over)
    return args


def test_valid_inputs_pass():
    out, lse = partial_attention_gqa(**gqa_args())
    assert out.shape == (B, HQ, DV) and lse.shape == (B, HQ)
    out, lse = partial_attention_mla(**mla_args())
    assert out.shape == (B, H, R) and lse.shape == (B, H)
    out, lse = merge_partials(torch.randn(2, B, H, R), torch.randn(2, B, H))
    assert out.shape == (B, H, R)


GQA_CASES = [
    (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
    (dict(q=torch.randn(B, HQ)), ValueError, r"q must be 3-D \[B, Hq, D\]"),
    (dict(k_cache=torch.randn(PAGES, P, KH * D)), ValueError, r"k_cache must be 4-D"),
    (dict(v_cache=torch.randn(PAGES, P, KH)), ValueError, r"v_cache must be 4-D"),
    (dict(page_table=torch.zeros(B * MAXP, dtype=torch.int32)), ValueError, r"page_table must be 2-D"),
    (dict(seq_lens=torch.zeros(B, 1, dtype=torch.int32)), ValueError, r"seq_lens must be 1-D"),
    (dict(q=torch.randn(B, HQ, D, dtype=torch.float64)), TypeError, r"q has dtype torch.float64; use float16"),
    (dict(k_cache=torch.randn(PAGES, P, KH, D).half()), TypeError, r"k_cache has dtype torch.float16 but q has"),
    (dict(v_cache=torch.randn(PAGES, P, KH, DV).bfloat16()), TypeError, r"cast v_cache to torch.float32"),
    (dict(page_table=torch.zeros(B, MAXP)), TypeError, r"page_table has dtype torch.float32; use int32 or int64"),
    (dict(seq_lens=torch.tensor([5, 12], dtype=torch.int16)), TypeError, r"seq_lens has dtype torch.int16"),
    (dict(q=torch.randn(B, 3, D)), ValueError, r"Hq=3 heads, not divisible by Kh=2"),
    (dict(q=torch.randn(B, HQ, D + 1)), ValueError, r"q head dim D=17 != k_cache head dim 16"),
    (dict(v_cache=torch.randn(PAGES, P, KH + 1, DV)), ValueError, r"must agree on \[num_pages, P, Kh\]"),
    (dict(page_table=torch.zeros(B + 1, MAXP, dtype=torch.int32)), ValueError, r"page_table has 3 rows but q has batch size B=2"),
    (dict(seq_lens=torch.tensor([5], dtype=torch.int32)), ValueError, r"seq_lens has shape \(1,\) but q has B=2"),
    (dict(q=torch.randn(B, D, HQ).transpose(1, 2)), ValueError, r"q must have a contiguous last dim"),
    (dict(k_cache=torch.randn(PAGES, P, D, KH).transpose(2, 3)), ValueError, r"k_cache must have a contiguous last dim"),
    (dict(seq_lens=torch.tensor([5, 13], dtype=torch.int32)), ValueError, r"seq_lens max 13 exceeds page_table capacity .* = 12; widen page_table to >= 4 columns"),
    (dict(seq_lens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"seq_lens must be >= 0"),
    (dict(scale=float("nan")), TypeError, r"scale must be a finite Python float"),
    (dict(scale=torch.tensor(0.5)), TypeError, r"scale must be a finite Python float"),
]


@pytest.mark.parametrize("over,exc,match", GQA_CASES, ids=[m for _, _, m in GQA_CASES])
def test_gqa_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        partial_attention_gqa(**gqa_args(**over))


@pytest.mark.skipif(not torch.backends.mps.is_available() and not torch.cuda.is_available(), reason="needs a 2nd device")
def test_gqa_device_mismatch_real_device():
    other = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(ValueError, match=r"all inputs must be on one device"):
        partial_attention_gqa(**gqa_args(q=torch.randn(B, HQ, D, device=other)))


@pytest.mark.parametrize("fn,args", [(partial_attention_gqa, gqa_args), (partial_attention_mla, mla_args)])
def test_device_mismatch(fn, args):
    """The meta device stands in for a second device: the check must fire before any compute."""
    kwargs = args()
    kwargs["seq_lens"] = kwargs["seq_lens"].to("meta")
    with pytest.raises(ValueError, match=r"all inputs must be on one device, got .*seq_lens on meta"):
        fn(**kwargs)


MLA_CASES = [
    (dict(q_latent=torch.randn(B, H * R)), ValueError, r"q_latent must be 3-D \[B, H, R\]"),
    (dict(q_rope=torch.randn(B, H)), ValueError, r"q_rope must be 3-D"),
    (dict(kv_cache=torch.randn(PAGES, P, 1, R + DR)), ValueError, r"kv_cache must be 3-D \[num_pages, P, R \+ Dr\]"),
    (dict(q_latent=torch.randn(B, H, R).to(torch.int32)), TypeError, r"q_latent has dtype torch.int32"),
    (dict(q_rope=torch.randn(B, H, DR).half()), TypeError, r"q_rope has dtype torch.float16 but q_latent has"),
    (dict(kv_cache=torch.randn(PAGES, P, R + DR).bfloat16()), TypeError, r"kv_cache has dtype torch.bfloat16"),
    (dict(q_rope=torch.randn(B, H + 1, DR)), ValueError, r"q_rope shape \(2, 4, 8\) must match q_latent's \[B, H\]"),
    (dict(kv_cache=torch.randn(PAGES, P, R)), ValueError, r"kv_cache last dim 48 != R \+ Dr = 48 \+ 8 = 56"),
    (dict(page_table=torch.zeros(1, MAXP, dtype=torch.int64)), ValueError, r"page_table has 1 rows but q_latent has batch size B=2"),
    (dict(kv_cache=torch.randn(PAGES, R + DR, P).transpose(1, 2)), ValueError, r"kv_cache must have a contiguous last dim"),
    (dict(seq_lens=torch.tensor([0, 100])), ValueError, r"seq_lens max 100 exceeds page_table capacity"),
]


@pytest.mark.parametrize("over,exc,match", MLA_CASES, ids=[m for _, _, m in MLA_CASES])
def test_mla_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        partial_attention_mla(**mla_args(**over))


MERGE_CASES = [
    (torch.randn(B, H, R), torch.randn(2, B, H), ValueError, r"outs must be 4-D \[S, B, H, Dv\]"),
    (torch.randn(2, B, H, R), torch.randn(2, B), ValueError, r"lses must be 3-D \[S, B, H\]"),
    (torch.randn(2, B, H, R), torch.randn(3, B, H), ValueError, r"lses shape \(3, 2, 3\) must equal outs' \[S, B, H\]"),
    (torch.randn(0, B, H, R), torch.randn(0, B, H), ValueError, r"at least one partial"),
    (torch.randn(2, B, H, R).double(), torch.randn(2, B, H), TypeError, r"outs has dtype torch.float64"),
    (torch.randn(2, B, H, R), torch.zeros(2, B, H, dtype=torch.int32), TypeError, r"lses has dtype torch.int32"),
    (torch.randn(2, B, R, H).transpose(2, 3), torch.randn(2, B, H), ValueError, r"outs must have a contiguous last dim"),
    (torch.randn(2, B, H, R), torch.randn(2, B, H, device="meta"), ValueError, r"all inputs must be on one device"),
]


@pytest.mark.parametrize("outs,lses,exc,match", MERGE_CASES, ids=[m for *_, m in MERGE_CASES])
def test_merge_validation(outs, lses, exc, match):
    with pytest.raises(exc, match=match):
        merge_partials(outs, lses)


@pytest.mark.parametrize("fn,args", [(partial_attention_gqa, gqa_args), (partial_attention_mla, mla_args)])
def test_unknown_impl_lists_choices(fn, args):
    with pytest.raises(ValueError, match=r"impl='cuda' is unknown; choose one of 'auto', 'reference', 'torch', 'triton', 'flashinfer'"):
        fn(**args(), impl="cuda")


def test_merge_unknown_impl_lists_choices():
    with pytest.raises(ValueError, match=r"impl='flashinfer' is unknown; choose one of 'auto', 'reference', 'torch', 'triton'"):
        merge_partials(torch.randn(2, B, H, R), torch.randn(2, B, H), impl="flashinfer")


@pytest.mark.parametrize("fn,args", [(partial_attention_gqa, gqa_args), (partial_attention_mla, mla_args)])
def test_triton_on_cpu_needs_interpreter(monkeypatch, fn, args):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"impl='triton' on cpu needs TRITON_INTERPRET=1.*use impl='torch'"):
        fn(**args(), impl="triton")


def test_triton_merge_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs TRITON_INTERPRET=1"):
        merge_partials(torch.randn(2, B, H, R), torch.randn(2, B, H), impl="triton")


def test_triton_env_set_after_import_is_caught(monkeypatch):
    from sglang_helix.kernels import triton_decode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_decode, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"must be set before sglang_helix.kernels is first imported"):
        partial_attention_gqa(**gqa_args(), impl="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="flashinfer may really be available on CUDA")
@pytest.mark.parametrize("fn,args", [(partial_attention_gqa, gqa_args), (partial_attention_mla, mla_args)])
def test_flashinfer_unavailable_is_clear(fn, args):
    with pytest.raises(ValueError, match=r"impl='flashinfer' needs CUDA tensors, flashinfer installed"):
        fn(**args(), impl="flashinfer")


def test_gpu_paths_report_unavailable_on_cpu():
    from sglang_helix.kernels import gpu

    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    a = gqa_args()
    m = mla_args()
    assert not gpu.available()
    assert not gpu.flashinfer_gqa_available(a["q"], a["k_cache"], a["v_cache"])
    assert not gpu.flashinfer_mla_available(m["q_latent"], m["q_rope"], m["kv_cache"])
    assert not gpu.flashmla_available(m["q_latent"], m["q_rope"], m["kv_cache"])
