"""sglang_helix.kernel_path: every request resolves as its module doc says (on CPU, and on a CUDA
device with the libraries' capability checks stubbed), GPU-only requests refuse on CPU naming what
is missing, and a HelixAttention layer resolves its kernels once, never while it runs."""

from __future__ import annotations

import pytest
import torch

from sglang_helix import kernel_path
from sglang_helix.config import HelixConfig, HelixConfigError
from sglang_helix.decode import HelixAttention
from sglang_helix.extend import helix_extend
from sglang_helix.kernel_path import KernelInputs, KernelPath, resolve_kernel_path
from sglang_helix.kernels import blackwell, gpu
from sglang_helix.kernels.reference import gqa_partial_ref, mla_partial_ref
from sglang_helix.metadata import plan_extend

BF16, FP32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn


def gqa_inputs(q_dtype=BF16, kv_dtype=BF16, d=128, dv=128, page=64):
    return KernelInputs(False, q_dtype, kv_dtype, heads=8, head_dim=d, value_dim=dv, page_size=page)


def mla_inputs(q_dtype=BF16, kv_dtype=BF16, rank=512, rope=64, page=64, heads=16):
    return KernelInputs(True, q_dtype, kv_dtype, heads=heads, head_dim=rank, value_dim=rank, page_size=page,
                        rope_dim=rope)


def parts(path: KernelPath) -> tuple[str, str, str]:
    return path.decode, path.merge, path.extend


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
@pytest.mark.parametrize("request_,want", [
    ("auto", ("torch", "torch", "torch")),
    ("torch", ("torch", "torch", "torch")),
    ("reference", ("reference", "reference", "reference")),
])
def test_cpu_requests(mla, request_, want):
    inputs = mla_inputs(FP32, FP32) if mla else gqa_inputs(FP32, FP32)
    for given in (inputs, None):  # the library checks never pick a library on CPU
        path = resolve_kernel_path(request_, "cpu", mla=mla, inputs=given)
        assert parts(path) == want and path.mla == mla and path.request == request_


@pytest.mark.triton
@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_triton_under_the_interpreter(mla):
    assert parts(resolve_kernel_path("triton", "cpu", mla=mla)) == ("triton",) * 3


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"impl='triton' on cpu needs TRITON_INTERPRET=1.*use impl='torch'"):
        resolve_kernel_path("triton", "cpu")


@pytest.mark.parametrize("mla,request_,needs", [
    (False, "flashinfer", r"impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16 q"),
    (True, "flashinfer", r"impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16, R=512"),
    (True, "flashmla", r"impl='flashmla' needs CUDA tensors, sgl-kernel's FlashMLA installed"),
    (True, "blackwell", r"backend='blackwell'\) cannot run here: trtllm-gen needs a CUDA device \(got cpu\); "
                        r"cute-dsl needs a CUDA device"),
    (True, "trtllm_mla", r"trtllm-gen needs a CUDA device \(got cpu\)"),
    (True, "cutedsl_mla", r"cute-dsl needs a CUDA device \(got cpu\)"),
])
def test_gpu_only_requests_refuse_on_cpu(mla, request_, needs):
    inputs = mla_inputs() if mla else gqa_inputs()
    with pytest.raises(ValueError, match=needs):
        resolve_kernel_path(request_, "cpu", mla=mla, inputs=inputs)
    with pytest.raises(ValueError, match=rf"impl={request_!r} needs the inputs' dtypes and dims"):
        resolve_kernel_path(request_, "cpu", mla=mla)


def test_unknown_and_mismatched_requests():
    with pytest.raises(ValueError, match=r"impl='flashmla' is unknown; choose one of 'auto', 'reference'"):
        resolve_kernel_path("flashmla", "cpu", mla=False)  # an MLA-only library
    with pytest.raises(ValueError, match=r"KernelInputs\(mla=True\) for a GQA kernel path"):
        resolve_kernel_path("auto", "cpu", mla=False, inputs=mla_inputs())
    with pytest.raises(ValueError, match=r"no GQA kernel path decode='flashmla'"):
        KernelPath("auto", "flashmla", "torch", "torch", mla=False)
    with pytest.raises(HelixConfigError, match=r"kernels decode=torch .* are for GQA, the HelixConfig is MLA"):
        HelixAttention(HelixConfig(kvp=1, num_heads=2, num_kv_heads=1, mla=True), 0, None, max_batch=1,
                       max_local_pages=1, kernels=resolve_kernel_path("torch", "cpu"))


def test_entry_points_refuse_a_path_of_the_other_kind():
    from sglang_helix.attention import partial_attention_gqa

    q, kc = torch.randn(1, 2, 4), torch.randn(2, 2, 1, 4)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"an MLA KernelPath .* passed to the GQA decode entry point"):
        partial_attention_gqa(q, kc, kc, table, lens, 0.5, resolve_kernel_path("torch", "cpu", mla=True))


# ----------------------------------------------------------------------------- a CUDA device (stubbed)


@pytest.fixture
def libraries(monkeypatch):
    """Which GPU library checks pass on the pretend CUDA device (none by default)."""
    fits = set()
    monkeypatch.setattr(gpu, "flashinfer_gqa_fits", lambda *a: "flashinfer-gqa" in fits)
    monkeypatch.setattr(gpu, "flashinfer_mla_fits", lambda *a: "flashinfer-mla" in fits)
    monkeypatch.setattr(gpu, "flashmla_fits", lambda *a: "flashmla" in fits)
    monkeypatch.setattr(blackwell, "unavailable_reason_for",
                        lambda *a, kv_contiguous=True: None if a[-1] in fits else "stubbed out")
    return fits


def test_cuda_auto_without_libraries_is_triton(libraries):
    for mla, inputs in ((False, gqa_inputs()), (True, mla_inputs()), (True, None)):
        assert parts(resolve_kernel_path("auto", "cuda", mla=mla, inputs=inputs)) == ("triton",) * 3


@pytest.mark.parametrize("mla,available,want", [
    (False, {"flashinfer-gqa"}, "flashinfer"),
    (True, {"trtllm-gen", "cute-dsl", "flashinfer-mla", "flashmla"}, "trtllm-gen"),
    (True, {"cute-dsl", "flashinfer-mla", "flashmla"}, "cute-dsl"),
    (True, {"flashinfer-mla", "flashmla"}, "flashinfer"),
    (True, {"flashmla"}, "flashmla"),
])
def test_cuda_auto_prefers_the_libraries_in_order(libraries, mla, available, want):
    libraries.update(available)
    path = resolve_kernel_path("auto", "cuda", mla=mla, inputs=mla_inputs() if mla else gqa_inputs())
    assert parts(path) == (want, "triton", "triton")
    graphs = resolve_kernel_path("auto", "cuda", mla=mla, inputs=mla_inputs() if mla else gqa_inputs(),
                                 cuda_graphs=True)
    assert parts(graphs) == ("triton",) * 3 and graphs.capturable and not path.capturable


def test_cuda_named_library_and_graphs(libraries):
    libraries.add("flashinfer-gqa")
    assert resolve_kernel_path("flashinfer", "cuda", inputs=gqa_inputs()).decode == "flashinfer"
    with pytest.raises(ValueError, match=r"impl='flashinfer' \(decode kernel flashinfer\) cannot be captured "
                                         r"in a CUDA graph.*--cuda-graph-backend-decode=disabled"):
        resolve_kernel_path("flashinfer", "cuda", inputs=gqa_inputs(), cuda_graphs=True)
    with pytest.raises(ValueError, match=r"impl='torch' \(decode kernel torch\) cannot be captured"):
        resolve_kernel_path("torch", "cuda", cuda_graphs=True)
    assert resolve_kernel_path("torch", "cpu", cuda_graphs=True).decode == "torch"  # no graphs on CPU


def test_cuda_fp8_mla_pages(libraries):
    libraries.update({"trtllm-gen", "cute-dsl", "flashinfer-mla", "flashmla"})  # stubs ignore the dtype
    for request in ("flashinfer", "flashmla", "blackwell"):
        with pytest.raises(ValueError, match=rf"impl={request!r} reads bf16/fp16 MLA pages only"):
            resolve_kernel_path(request, "cuda", mla=True, inputs=mla_inputs(kv_dtype=FP8))


def test_cuda_extend_falls_back_to_torch_for_inputs_triton_does_not_take():
    assert kernel_path.resolve_extend("auto", torch.device("cuda"), q_dtype=BF16, kv_dtypes=(FP8,)) == "triton"
    assert kernel_path.resolve_extend("auto", torch.device("cuda"), q_dtype=torch.float64) == "torch"
    assert kernel_path.resolve_extend("auto", torch.device("cuda"), q_dtype=BF16, kv_dtypes=(FP32,)) == "torch"
    assert kernel_path.resolve_extend("auto", torch.device("cuda"), contiguous=False) == "torch"


def test_real_capability_checks_say_no_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert parts(resolve_kernel_path("auto", "cpu", mla=True, inputs=mla_inputs())) == ("torch",) * 3
    assert not gpu.flashinfer_gqa_fits(torch.device("cuda"), BF16, BF16, 128, 128)


# ----------------------------------------------------------------------------- resolved once


@pytest.fixture
def resolutions(monkeypatch):
    """Counts every kernel-path build and every per-call merge / extend resolution."""
    calls = []
    build = KernelPath.__post_init__
    resolve_merge, resolve_extend = kernel_path.resolve_merge, kernel_path.resolve_extend

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(KernelPath, "__post_init__", counted("path", build))
    monkeypatch.setattr(kernel_path, "resolve_merge", counted("merge", resolve_merge))
    monkeypatch.setattr(kernel_path, "resolve_extend", counted("extend", resolve_extend))
    return calls


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_layers_run_without_resolving(resolutions, mla):
    """HelixAttention resolves its request once, at construction; its decode layers (partial +
    merge) and helix_extend on its KernelPath never resolve again, and match the fp32 reference."""
    g = torch.Generator().manual_seed(1)
    heads, dim, page, lens = 4, 8, 4, torch.tensor([7, 1, 12])
    cfg = HelixConfig(kvp=1, num_heads=heads, num_kv_heads=1 if mla else 2, mla=mla, page_size=page)
    attn = HelixAttention(cfg, 0, None, max_batch=4, max_local_pages=4, kernels="auto")
    assert resolutions == ["merge", "extend", "path"]  # resolve_kernel_path, once
    resolutions.clear()
    table = torch.arange(12).reshape(3, 4).flip(0).int()
    attn.plan(lens, table)
    for _ in range(3):  # three layers
        if mla:
            ql, qr, kv = (torch.randn(3, heads, dim, generator=g), torch.randn(3, heads, 2, generator=g),
                          torch.randn(12, page, dim + 2, generator=g))
            out = attn.forward_mla(ql, qr, kv, 0.3)
            want, _ = mla_partial_ref(ql, qr, kv, table, lens, 0.3)
        else:
            q, kc, vc = (torch.randn(3, heads, dim, generator=g), torch.randn(12, page, 2, dim, generator=g),
                         torch.randn(12, page, 2, dim, generator=g))
            out = attn.forward_gqa(q, kc, vc, 0.3)
            want, _ = gqa_partial_ref(q, kc, vc, table, lens, 0.3)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        kv_heads = 1 if mla else 2
        qx, kx = torch.randn(5, heads, dim, generator=g), torch.randn(5, kv_heads, dim, generator=g)
        pages = torch.randn(12, page, kv_heads, dim, generator=g)
        for prefix in ([0, 0], [5, 0]):  # the chunk alone; over a cached prefix (partial + exchange)
            plan = plan_extend([2, 3], prefix, 0, page, 1, local_tables=lambda lens: (table[:2, :2],))
            helix_extend(qx, kx, kx, plan, pages, pages, 0.3, kvp_rank=0, heads_per_rank=heads,
                         exchange=attn.exchange, kernels=attn.kernels)
    assert resolutions == []
