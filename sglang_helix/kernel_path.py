"""The kernel path: which decode kernel, which LSE merge and which extend kernels a Helix rank
runs, chosen once and carried as a frozen `KernelPath` whose kernels are bound at construction.

`resolve_kernel_path` is the one place where a request (the `impl=` name) becomes kernels, from the
device, the inputs' dtypes and dims (`KernelInputs`) and the libraries' capability checks. A helix
backend resolves it when it is built and HelixAttention when it is constructed; the layers only
call its bound kernels (`run_decode`, `run_merge`, `run_chunk`, `run_prefix`) through the
validated entry points (sglang_helix.attention), no string compared per call. Handed a request
string instead (tests, benchmarks), the entry points resolve it per call from their tensors.

Requests (`impl=`) and what they resolve to (decode / merge / extend):
- "auto": decode on a GPU library where its capability check passes for the inputs (MLA: the
  Blackwell kernels first, kernels/blackwell.py; then flashinfer, then FlashMLA; GQA: flashinfer),
  else Triton on CUDA, else torch; merge and extend Triton on CUDA, torch elsewhere (extend:
  torch also for inputs Triton does not take). Without inputs, or with CUDA graphs, no library.
- "reference" (fp32 loops, kernels/reference.py), "torch" (kernels/torch_*.py), "triton"
  (kernels/triton_*.py; on CPU only under TRITON_INTERPRET=1): that kernel everywhere.
- "flashinfer", MLA "flashmla", MLA "blackwell" / "trtllm_mla" / "cutedsl_mla": that library for
  decode (refused, naming what is missing, where its check fails or without inputs), merge and
  extend as "auto".
CUDA graphs (`cuda_graphs=True` on a CUDA device): the decode kernel must be capturable (Triton:
static grids; the library wrappers plan on the host per call), so "auto" takes Triton and any
other request ("triton" aside) is refused.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kernels import blackwell, gpu, kv_quant, reference, torch_decode, torch_extend
from .tensor_checks import FLOAT_DTYPES, check_float, check_kv, check_last_contiguous

GQA_REQUESTS = ("auto", "reference", "torch", "triton", "flashinfer")
MLA_REQUESTS = GQA_REQUESTS + ("flashmla",) + blackwell.IMPLS
MERGE_REQUESTS = EXTEND_REQUESTS = ("auto", "reference", "torch", "triton")
_SAME_NAME = ("reference", "torch", "triton")  # requests that name one kernel for every part
CAPTURABLE_DECODE = ("triton",)


@dataclass(frozen=True)
class KernelInputs:
    """What the decode kernel choice depends on besides the device, known when a backend is built.

    q_dtype: the queries' (activation) dtype; kv_dtype: the pages' (q's or fp8); heads: query
    heads of one call (GQA H/TPA, MLA H); head_dim: GQA D, MLA R (latent); value_dim: GQA Dv
    (MLA: R); rope_dim: MLA Dr (GQA 0); page_size: tokens per page; kv_contiguous: the pages
    are one contiguous tensor (a pool's are).
    """

    mla: bool
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    heads: int
    head_dim: int
    value_dim: int
    page_size: int
    rope_dim: int = 0
    kv_contiguous: bool = True

    @classmethod
    def of_gqa(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> "KernelInputs":
        """From one call's q [B, Hq, D], k_cache [pages, P, Kh, D], v_cache [pages, P, Kh, Dv]."""
        return cls(False, q.dtype, k_cache.dtype, q.shape[1], q.shape[-1], v_cache.shape[-1], k_cache.shape[1])

    @classmethod
    def of_mla(cls, q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor) -> "KernelInputs":
        """From one call's q_latent [B, H, R], q_rope [B, H, Dr], kv_cache [pages, P, R + Dr]."""
        rank = q_latent.shape[-1]
        return cls(True, q_latent.dtype, kv_cache.dtype, q_latent.shape[1], rank, rank, kv_cache.shape[1],
                   q_rope.shape[-1], kv_cache.is_contiguous())


@dataclass(frozen=True)
class KernelPath:
    """The resolved kernels. request: what was asked for; decode: "reference", "torch", "triton",
    "flashinfer", MLA "flashmla" / "trtllm-gen" / "cute-dsl"; merge and extend: "reference",
    "torch" or "triton"; mla: the decode kernels are absorbed MLA's (else GQA's).

    Bound at construction (uniform signatures, shapes as sglang_helix.attention documents):
    decode(a, b, c, page_table, seq_lens, scale, *, k_scale, v_scale, out_dtype, host_seq_lens)
        with (a, b, c) = (q, k_cache, v_cache) or (q_latent, q_rope, kv_cache) -> (out, lse);
    merge(outs, lses) -> (out, lse); chunk(q, k, v, extend_lens, scale, *, k_scale, v_scale);
    prefix(q, k_pages, v_pages, page_table, extend_lens, local_prefix_lens, scale, *, k_scale,
    v_scale) -> (out fp32, lse fp32).
    """

    request: str
    decode: str
    merge: str
    extend: str
    mla: bool = False
    run_decode: Callable = field(init=False, repr=False, compare=False)
    run_merge: Callable = field(init=False, repr=False, compare=False)
    run_chunk: Callable = field(init=False, repr=False, compare=False)
    run_prefix: Callable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        decode = _DECODE.get((self.decode, self.mla))
        if decode is None or self.merge not in _MERGE or self.extend not in _EXTEND:
            kind = "MLA" if self.mla else "GQA"
            raise ValueError(f"no {kind} kernel path decode={self.decode!r}, merge={self.merge!r}, "
                             f"extend={self.extend!r}; build it with resolve_kernel_path")
        chunk, prefix = extend_kernels(self.extend)
        for name, fn in (("run_decode", decode()), ("run_merge", merge_kernel(self.merge)),
                         ("run_chunk", chunk), ("run_prefix", prefix)):
            object.__setattr__(self, name, fn)

    @property
    def capturable(self) -> bool:
        """The decode kernel can be captured in a CUDA graph (static grid, no host planning)."""
        return self.decode in CAPTURABLE_DECODE

    def describe(self) -> str:
        return f"decode={self.decode} merge={self.merge} extend={self.extend} (impl={self.request!r})"


# ----------------------------------------------------------------------------- resolution


def resolve_kernel_path(request: str = "auto", device="cpu", *, mla: bool = False,
                        inputs: KernelInputs | None = None, cuda_graphs: bool = False) -> KernelPath:
    """The KernelPath for `request` (module doc) on `device`. inputs: the dtypes and dims the
    library checks need (None: no library is considered, and naming one is refused).
    cuda_graphs: the decode kernel will be captured (matters on CUDA only)."""
    check_request(request, MLA_REQUESTS if mla else GQA_REQUESTS)
    if inputs is not None and inputs.mla != mla:
        raise ValueError(f"KernelInputs(mla={inputs.mla}) for a {'MLA' if mla else 'GQA'} kernel path")
    device = torch.device(device)
    graphs = cuda_graphs and device.type == "cuda"
    decode = _decode_for(request, device, mla, inputs, graphs)
    if graphs and decode not in CAPTURABLE_DECODE:
        raise ValueError(f"impl={request!r} (decode kernel {decode}) cannot be captured in a CUDA graph "
                         f"(it plans on the host per call); use impl='auto' or 'triton', or serve "
                         f"with --cuda-graph-backend-decode=disabled")
    dtypes = (inputs.q_dtype, (inputs.kv_dtype,)) if inputs is not None else (None, ())
    return KernelPath(request, decode, resolve_merge(request, device),
                      resolve_extend(request, device, q_dtype=dtypes[0], kv_dtypes=dtypes[1]), mla)


def check_request(request, choices) -> None:
    if request not in choices:
        raise ValueError(f"impl={request!r} is unknown; choose one of {', '.join(map(repr, choices))}")


def check_triton(device: torch.device) -> None:
    """Raise unless Triton can run on `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return
    from .kernels import triton_decode  # noqa: PLC0415 - import only when Triton is asked for

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' on {device} needs TRITON_INTERPRET=1 (interpreter, tests only); "
                         f"use impl='torch' on CPU")
    if not triton_decode.INTERPRETED:
        raise ValueError("impl='triton' on CPU: TRITON_INTERPRET=1 must be set before sglang_helix.kernels "
                         "is first imported (triton.jit reads it at decoration)")


def resolve_merge(request: str, device: torch.device) -> str:
    """The merge kernel of `request` (a decode library request merges as "auto")."""
    if request in _SAME_NAME:
        if request == "triton":
            check_triton(device)
        return request
    return "triton" if device.type == "cuda" else "torch"


def resolve_extend(request: str, device: torch.device, *, q_dtype=None, kv_dtypes=(),
                   contiguous: bool = True) -> str:
    """The extend kernels of `request`; "auto" (and a decode library) takes Triton on CUDA where
    it fits: q fp16/bf16/fp32 (None: not known yet), K/V in q's dtype or fp8, last dims contiguous."""
    if request in _SAME_NAME:
        if request == "triton":
            check_triton(device)
        return request
    fits = contiguous and (q_dtype is None or (q_dtype in FLOAT_DTYPES and all(
        d == q_dtype or kv_quant.is_fp8(d) for d in kv_dtypes)))
    return "triton" if device.type == "cuda" and fits else "torch"


def _decode_for(request: str, device: torch.device, mla: bool, inputs, graphs: bool) -> str:
    if request in _SAME_NAME:
        if request == "triton":
            check_triton(device)
        return request
    if request == "auto":
        found = _library(inputs, device) if inputs is not None and not graphs else None
        return found or ("triton" if device.type == "cuda" else "torch")
    if inputs is None:
        raise ValueError(f"impl={request!r} needs the inputs' dtypes and dims for its capability check: "
                         f"resolve with inputs=KernelInputs(...) (a helix backend does), or use impl='auto'")
    if mla and kv_quant.is_fp8(inputs.kv_dtype):
        raise ValueError(f"impl={request!r} reads bf16/fp16 MLA pages only, got {inputs.kv_dtype} "
                         f"(--kv-cache-dtype fp8_*): use impl='triton' or 'auto' (the Triton kernel "
                         f"reads fp8 pages), or serve with --kv-cache-dtype auto")
    if request in blackwell.IMPLS:  # raises, naming each kernel's missing requirement
        return blackwell.require(_blackwell_reason(inputs, device), request)
    name = "flashinfer" if request == "flashinfer" else "flashmla"
    if _FITS[name, mla](inputs, device):
        return name
    raise ValueError(f"impl={request!r} needs {_NEEDS[name, mla]}; use impl='triton' or 'auto'")


def _library(inputs: KernelInputs, device: torch.device) -> str | None:
    """The first GPU library whose check passes (MLA: Blackwell, flashinfer, FlashMLA), or None."""
    if inputs.mla:
        found = blackwell.choose(_blackwell_reason(inputs, device))
        if found:
            return found
    for name in ("flashinfer", "flashmla") if inputs.mla else ("flashinfer",):
        if _FITS[name, inputs.mla](inputs, device):
            return name
    return None


def _blackwell_reason(inputs: KernelInputs, device: torch.device):
    return functools.partial(blackwell.unavailable_reason_for, device, inputs.q_dtype, inputs.kv_dtype,
                             inputs.head_dim, inputs.rope_dim, inputs.heads, inputs.page_size,
                             kv_contiguous=inputs.kv_contiguous)


_FITS = {
    ("flashinfer", False): lambda i, d: gpu.flashinfer_gqa_fits(d, i.q_dtype, i.kv_dtype, i.head_dim, i.value_dim),
    ("flashinfer", True): lambda i, d: gpu.flashinfer_mla_fits(d, i.q_dtype, i.kv_dtype, i.head_dim, i.rope_dim),
    ("flashmla", True): lambda i, d: gpu.flashmla_fits(d, i.q_dtype, i.kv_dtype, i.head_dim, i.rope_dim,
                                                       i.page_size),
}
_NEEDS = {
    ("flashinfer", False): "CUDA tensors, flashinfer installed, fp16/bf16 q, pages in q's dtype or fp8 "
                           "e4m3/e5m2, Dv == D in (64, 128, 256)",
    ("flashinfer", True): "CUDA tensors, flashinfer installed, fp16/bf16, R=512, Dr=64",
    ("flashmla", True): "CUDA tensors, sgl-kernel's FlashMLA installed, fp16/bf16, R=512, Dr=64, page size 64",
}

# ----------------------------------------------------------------------------- kernel tables
# Each decode entry makes the kernel with the uniform signature (KernelPath doc); Triton modules
# are imported only when a path binds them.


def _reference(fn):
    def run(*args, k_scale, v_scale, out_dtype, host_seq_lens):
        out, lse = fn(*args, k_scale=k_scale, v_scale=v_scale)
        return out.to(out_dtype), lse

    return run


def _torch(fn):
    def run(*args, k_scale, v_scale, out_dtype, host_seq_lens):
        return fn(*args, host_seq_lens=host_seq_lens, out_dtype=out_dtype, k_scale=k_scale, v_scale=v_scale)

    return run


def _triton(name: str):
    from .kernels import triton_decode  # noqa: PLC0415

    fn = getattr(triton_decode, name)

    def run(*args, k_scale, v_scale, out_dtype, host_seq_lens):
        return fn(*args, out_dtype=out_dtype, k_scale=k_scale, v_scale=v_scale)

    return run


def _library_kernel(fn, scaled: bool):
    """A library wrapper (q's dtype out). The MLA libraries take no scales: their paths are
    resolved for pages in q's dtype only (scales 1)."""
    def run(*args, k_scale, v_scale, out_dtype, host_seq_lens):
        out, lse = fn(*args, k_scale=k_scale, v_scale=v_scale) if scaled else fn(*args)
        return out.to(out_dtype), lse

    return run


def _blackwell(backend: str):
    return _library_kernel(functools.partial(blackwell.launch, backend), False)


_DECODE = {
    ("reference", False): lambda: _reference(reference.gqa_partial_ref),
    ("reference", True): lambda: _reference(reference.mla_partial_ref),
    ("torch", False): lambda: _torch(torch_decode.gqa_partial_torch),
    ("torch", True): lambda: _torch(torch_decode.mla_partial_torch),
    ("triton", False): lambda: _triton("gqa_partial_triton"),
    ("triton", True): lambda: _triton("mla_partial_triton"),
    ("flashinfer", False): lambda: _library_kernel(gpu.gqa_partial_flashinfer, True),
    ("flashinfer", True): lambda: _library_kernel(gpu.mla_partial_flashinfer, False),
    ("flashmla", True): lambda: _library_kernel(gpu.mla_partial_flashmla, False),
    ("trtllm-gen", True): lambda: _blackwell("trtllm-gen"),
    ("cute-dsl", True): lambda: _blackwell("cute-dsl"),
}


def _merge_triton():
    from .kernels.triton_merge import merge_triton  # noqa: PLC0415

    return merge_triton


def _merge_torch():
    def merge(outs, lses):  # merge_ref is already vectorised: "torch" and "reference" share it
        out, lse = reference.merge_ref(outs, lses)
        return out.to(outs.dtype), lse

    return merge


_MERGE = {"reference": _merge_torch, "torch": _merge_torch, "triton": _merge_triton}


def _triton_extend(name: str, kv_names: tuple[str, str]):
    """The Triton extend half `name`, after its input checks (q fp16/bf16/fp32, K/V in q's dtype or
    fp8, last dims contiguous; the torch paths take any view)."""
    def run(q, k, v, *rest, k_scale, v_scale):
        from .kernels import triton_extend  # noqa: PLC0415

        check_float("q", q)
        for label, t in zip(kv_names, (k, v)):
            check_kv(label, t, q, "q")
        for label, t in zip(("q",) + kv_names, (q, k, v)):
            check_last_contiguous(label, t)
        return getattr(triton_extend, name)(q, k, v, *rest, k_scale=k_scale, v_scale=v_scale)

    return run


_EXTEND = {
    "reference": (reference.chunk_attention_ref, reference.prefix_attention_ref),
    "torch": (torch_extend.chunk_attention_torch, torch_extend.prefix_attention_torch),
    "triton": (_triton_extend("chunk_attention_triton", ("k", "v")),
               _triton_extend("prefix_attention_triton", ("k_pages", "v_pages"))),
}


def merge_kernel(name: str) -> Callable:
    """The merge kernel `name` ("reference", "torch", "triton"): (outs, lses) -> (out, lse)."""
    return _MERGE[name]()


def extend_kernels(name: str) -> tuple[Callable, Callable]:
    """The extend kernels `name` ("reference", "torch", "triton"): (chunk, prefix)."""
    return _EXTEND[name]
