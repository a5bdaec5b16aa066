"""Helix attention kernels: decode partials, LSE merge and extend, each with an fp32 reference.

reference: fp32 torch references (ground truth for every kernel test).
torch_decode: vectorised, L-chunked torch decode partial attention (CPU production path).
torch_extend: tiled torch extend attention with LSE (CPU production path).
triton_decode / triton_merge / triton_extend: Triton paged partial attention, LSE merge and tiled
    extend attention (CUDA, or CPU under TRITON_INTERPRET=1 set before this package is imported).
gpu: flashinfer / sgl-kernel FlashMLA wrappers behind availability checks (not verified on GPU yet).
blackwell: flashinfer trtllm-gen / CuTe-DSL MLA decode on SM100 behind a capability check
    (not verified on GPU yet).
"""

from .reference import full_attention_ref, gqa_partial_ref, merge_ref, mla_partial_ref
from .torch_decode import gqa_partial_torch, mla_partial_torch

__all__ = [
    "full_attention_ref",
    "gqa_partial_ref",
    "merge_ref",
    "mla_partial_ref",
    "gqa_partial_torch",
    "mla_partial_torch",
]

try:  # triton is optional on torch-only CPU installs
    from .triton_decode import gqa_partial_triton, mla_partial_triton
    from .triton_merge import merge_triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
else:
    HAS_TRITON = True
    __all__ += ["gqa_partial_triton", "mla_partial_triton", "merge_triton"]
