"""Blackwell (SM100 / SM103) MLA partial decode on flashinfer's trtllm-gen and CuTe-DSL kernels.

STATUS: written against flashinfer 0.7.2 (the version SGLang 0.5.23 pins) but NOT VERIFIED ON A
GPU YET. The glue (query packing, block-table padding, LSE base, empty rows) is tested on CPU
against kernels/reference.py through a fake kernel with flashinfer's signature
(tests/core/test_blackwell.py). A first GPU run must compare it against the reference.

The kernel is the one SGLang 0.5.23 calls on Blackwell: `flashinfer.decode.
trtllm_batch_decode_with_kv_cache_mla` (defined in flashinfer/mla/_core.py), with
backend="trtllm-gen" in the `trtllm_mla` backend (TRTLLMMLABackend._run_decode_kernel) and
backend="cute-dsl" in `cutedsl_mla` (CuteDslMLABackend._run_decode_kernel). The call made here:

    query            [B, 1, H, R + Dr] = cat(q_latent, q_rope)   (SGLang: concat_mla_absorb_q)
    kv_cache         [num_pages, P, R + Dr], 3-D form accepted as is
    workspace_buffer 150 MiB int8 zeros per (backend, device) (SGLang DEFAULT_WORKSPACE_SIZE_MB);
                     cute-dsl overwrites its buffer with split-KV partials, so, as in SGLang, it
                     never shares the zero-init buffer whose semaphores trtllm-gen relies on
    qk_nope_head_dim 128 (unused by these two backends: autotune cache key only)
    kv_lora_rank R, qk_rope_head_dim Dr
    block_tables     [B, n] int32, n padded to a multiple of 128 // P (flashinfer's
                     _check_trtllm_gen_mla_shape: "block_num % (128 / block_size) == 0", required
                     for cute-dsl; SGLang's _calc_padded_blocks pads for both) with page 0
    seq_lens         [B] int32, this rank's local lengths (may be 0)
    max_seq_len      host int >= every seq_len, >= 1. Default: the table's capacity
                     max_pages * P, known without a host sync; over-estimating is allowed (SGLang's
                     CUDA-graph path passes max_context_len)
    bmm1_scale       the softmax scale (q_scale = k_scale = 1 for a bf16 cache:
                     SGLang's _compute_decode_bmm1_scale); bmm2_scale 1.0
    multi_ctas_kv_counter_buffer   trtllm-gen only: a persistent zeroed uint8 buffer of
                     flashinfer.utils.get_trtllm_gen_multi_ctas_kv_counter_bytes (as SGLang keeps);
                     safe for ordered launches on one stream
    return_lse=True, return_lse_base="base2"
    -> out [B, 1, H, R] bf16 (flashinfer allocates a bf16 output for every input dtype),
       lse [B, H] fp32

LSE base (flashinfer 0.7.2 docstring of return_lse_base: None keeps "base-2 for trtllm-gen ...
and natural-log for monolithic cute-dsl"; both kernels compute base 2 and scale at the store).
We ask both for base 2 explicitly (KERNEL_LSE_BASE), so the natural log comes from the one
conversion lse2 * ln 2 (gpu._natural_from_base2), whatever the backend's default.

Helix vs SGLang's DCP: DCP interleaves tokens over ranks inside one page table and cute-dsl masks
that cyclic layout in-kernel (enable_dcp). Helix owns whole pages, so a rank's local page table
and local seq_lens already describe exactly its tokens, and a single decode query needs no causal
bound (the case SGLang's trtllm_mla backend documents for q_len == 1). enable_dcp stays False.
Empty rows (local length 0) come back as garbage from both kernels (SGLang runs
fixup_zero_kv_rows after them); they are overwritten here with out 0 / lse -inf.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from .gpu import _natural_from_base2, _zero_empty_rows

BACKENDS = ("trtllm-gen", "cute-dsl")
# backend= spellings: flashinfer's names, SGLang's backend names, and one name for "either".
_CHOICES = {
    "auto": BACKENDS, "blackwell": BACKENDS,
    "trtllm-gen": ("trtllm-gen",), "trtllm_mla": ("trtllm-gen",),
    "cute-dsl": ("cute-dsl",), "cutedsl_mla": ("cute-dsl",),
}
IMPLS = ("blackwell", "trtllm_mla", "cutedsl_mla")  # the impl= names partial_attention_mla takes
KERNEL_LSE_BASE = "base2"
TRTLLM_BLOCK_CONSTRAINT = 128
WORKSPACE_BYTES = 150 * 1024 * 1024
QK_NOPE_HEAD_DIM = 128
_TRTLLM_DIMS = ((512, 64), (256, 64))  # (kv_lora_rank, qk_rope_head_dim) trtllm-gen compiles
_CUTE_DSL_DIMS = ((512, 64),)
_workspaces: dict[tuple[str, torch.device], torch.Tensor] = {}
_counters: dict[torch.device, torch.Tensor] = {}


@functools.cache
def _flashinfer():
    """flashinfer with .decode, .utils and (if importable) .cute_dsl.availability, or None."""
    try:
        import flashinfer  # type: ignore[import-not-found]  # noqa: PLC0415
        import flashinfer.decode  # noqa: F401, PLC0415
        import flashinfer.utils  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    try:  # importable without the CuTe DSL itself (flashinfer keeps it free of cutlass imports)
        import flashinfer.cute_dsl.availability  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001
        pass
    return flashinfer


def _compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of `device` if it is a CUDA device on this machine, else None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=8)
def _takes_lse_base(fn) -> bool:
    try:
        return "return_lse_base" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _cute_dsl_ok(fi, cc: tuple[int, int]) -> bool:
    avail = getattr(getattr(fi, "cute_dsl", None), "availability", None)
    if avail is None:
        return False
    try:
        return bool(avail.is_cute_dsl_available() and avail.is_cute_dsl_arch_supported(*cc))
    except Exception:  # noqa: BLE001 - a broken DSL install is "not available"
        return False


def unavailable_reason(q_latent, q_rope, kv_cache, backend: str) -> str | None:
    """None if `backend` ("trtllm-gen" or "cute-dsl") can run these tensors, else what is missing."""
    devices = {t.device for t in (q_latent, q_rope, kv_cache)}
    if len(devices) != 1:
        return "tensors on one device (got " + ", ".join(map(str, (t.device for t in (q_latent, q_rope, kv_cache)))) + ")"
    if q_rope.dtype != q_latent.dtype:
        return f"q_rope in q_latent's dtype, got {q_rope.dtype} and {q_latent.dtype}"
    return unavailable_reason_for(q_latent.device, q_latent.dtype, kv_cache.dtype, q_latent.shape[-1],
                                  q_rope.shape[-1], q_latent.shape[1], kv_cache.shape[1], backend,
                                  kv_contiguous=kv_cache.is_contiguous())


def unavailable_reason_for(device, q_dtype: torch.dtype, kv_dtype: torch.dtype, rank: int, rope_dim: int,
                           heads: int, page_size: int, backend: str, *, kv_contiguous: bool = True) -> str | None:
    """None if `backend` ("trtllm-gen" or "cute-dsl") runs on `device` for q [B, heads, rank] +
    [B, heads, rope_dim] in q_dtype over kv_dtype pages of page_size tokens, else what is missing
    (the capability check a kernel path is resolved with)."""
    if not kv_contiguous:
        return "a contiguous kv_cache [num_pages, P, R + Dr]"
    cc = _compute_capability(device)
    if cc is None:
        return f"a CUDA device (got {device})"
    if cc[0] != 10:
        return f"a Blackwell GPU, compute capability 10.x (B200/GB200/B300), got {cc[0]}.{cc[1]}"
    if {q_dtype, kv_dtype} != {torch.bfloat16}:
        return (f"bfloat16 queries and kv_cache (flashinfer writes a bf16 output), got {q_dtype} and "
                f"{kv_dtype}")
    reason = _shape_reason(backend, (rank, rope_dim), heads, page_size)
    if reason:
        return reason
    fi = _flashinfer()
    if fi is None:
        return "flashinfer installed (flashinfer-python; SGLang 0.5.23 pins 0.7.2)"
    if not _takes_lse_base(fi.decode.trtllm_batch_decode_with_kv_cache_mla):
        return "a flashinfer whose trtllm_batch_decode_with_kv_cache_mla takes return_lse_base (0.7.2)"
    if backend == "cute-dsl" and not _cute_dsl_ok(fi, cc):
        return f"the CuTe DSL (nvidia-cutlass-dsl) installed and targeting sm_{cc[0]}{cc[1]}"
    return None


def _shape_reason(backend: str, dims: tuple[int, int], heads: int, page: int) -> str | None:
    if backend == "trtllm-gen":
        if dims not in _TRTLLM_DIMS:
            return f"(R, Dr) in {_TRTLLM_DIMS} for trtllm-gen, got {dims}"
        if page not in (32, 64):
            return f"page size 32 or 64 for trtllm-gen, got {page}"
        if heads < 1 or 64 < heads < 128:
            return f"H <= 64 or H >= 128 heads for trtllm-gen (not 64 < H < 128), got {heads}"
        return None
    if dims not in _CUTE_DSL_DIMS:
        return f"(R, Dr) = (512, 64) for cute-dsl, got {dims}"
    if page < 2 or 128 % page:
        return f"a page size dividing 128 (2..128) for cute-dsl, got {page}"
    if not 1 <= heads <= 128:
        return f"1 <= H <= 128 heads for cute-dsl, got {heads}"
    return None


def _backends(backend: str) -> tuple[str, ...]:
    if backend not in _CHOICES:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {', '.join(map(repr, _CHOICES))}")
    return _CHOICES[backend]


def choose(reason_of: Callable[[str], str | None], backend: str = "auto") -> str | None:
    """The first of `backend`'s kernels (trtllm-gen before cute-dsl) whose reason_of(kernel) is
    None (it runs), or None."""
    return next((name for name in _backends(backend) if reason_of(name) is None), None)


def require(reason_of: Callable[[str], str | None], backend: str) -> str:
    """choose(reason_of, backend), or a ValueError naming what each of its kernels lacks."""
    chosen = choose(reason_of, backend)
    if chosen is None:
        reasons = "; ".join(f"{n} needs {reason_of(n)}" for n in _backends(backend))
        raise ValueError(f"Blackwell MLA decode (backend={backend!r}) cannot run here: {reasons}. "
                         f"Use impl='auto', which falls back to flashinfer / FlashMLA / Triton / torch")
    return chosen


def choose_backend(q_latent, q_rope, kv_cache, backend: str = "auto") -> str | None:
    """The first of `backend`'s kernels (trtllm-gen before cute-dsl) that fits these tensors, or None."""
    return choose(functools.partial(unavailable_reason, q_latent, q_rope, kv_cache), backend)


def blackwell_mla_available(q_latent, q_rope, kv_cache, backend: str = "auto") -> bool:
    """True where mla_partial_blackwell(..., backend=backend) can run these inputs: CUDA tensors on
    a compute-capability-10 GPU, bf16, the kernel's dims / page size / head count, flashinfer 0.7+
    importable (plus the CuTe DSL for cute-dsl). Cheap checks first; imports flashinfer only on
    Blackwell."""
    return choose_backend(q_latent, q_rope, kv_cache, backend) is not None


def block_table_for_kernel(page_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """page_table [B, n] -> int32 [B, n'] with n' the next multiple of 128 // P, padded with page 0.

    The kernels read only the first ceil(seq_len / P) entries of a row, so the padding is never
    attended. No copy when the table is already int32, contiguous and aligned (plan-time work)."""
    multiple = max(1, TRTLLM_BLOCK_CONSTRAINT // page_size)
    table = page_table.to(torch.int32)
    pad = -table.shape[1] % multiple
    if pad:
        table = torch.nn.functional.pad(table, (0, pad), value=0)
    return table.contiguous()


def _workspace(backend: str, device: torch.device) -> torch.Tensor:
    key = (backend, device)
    if key not in _workspaces:
        _workspaces[key] = torch.zeros(WORKSPACE_BYTES, dtype=torch.int8, device=device)
    return _workspaces[key]


def _counter_buffer(fi, device: torch.device, bsz: int, heads: int) -> torch.Tensor:
    """trtllm-gen's multi-CTA semaphores: zeroed once (the kernel resets them), grown on demand."""
    sm_count = fi.utils.get_device_sm_count(device)
    need = fi.utils.get_trtllm_gen_multi_ctas_kv_counter_bytes(bsz, heads, sm_count)
    buf = _counters.get(device)
    if buf is None or buf.numel() < need:
        buf = _counters[device] = torch.zeros(need, dtype=torch.uint8, device=device)
    return buf


def mla_partial_blackwell(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, *,
                          backend: str = "auto", max_seq_len: int | None = None):
    """Partial absorbed-MLA decode on flashinfer's Blackwell kernels (contract of
    reference.mla_partial_ref).

    q_latent [B, H, R]; q_rope [B, H, Dr]; kv_cache [num_pages, P, R + Dr]; page_table
    [B, max_pages] (local page i -> physical page); seq_lens [B] local lengths; scale: softmax
    scale. backend: "auto"/"blackwell" (trtllm-gen, else cute-dsl), "trtllm-gen"/"trtllm_mla",
    "cute-dsl"/"cutedsl_mla". max_seq_len: optional host bound on seq_lens (default: the table's
    capacity, no host sync). Returns out [B, H, R] in q's dtype (bf16) and lse [B, H] fp32
    natural log; empty rows give out 0 / lse -inf. Raises ValueError naming the missing
    requirement where the kernel cannot run (blackwell_mla_available says which inputs can).
    """
    chosen = require(functools.partial(unavailable_reason, q_latent, q_rope, kv_cache), backend)
    return launch(chosen, q_latent, q_rope, kv_cache, page_table, seq_lens, scale, max_seq_len=max_seq_len)


def launch(backend: str, q_latent, q_rope, kv_cache, page_table, seq_lens, scale, *,
           max_seq_len: int | None = None):
    """mla_partial_blackwell on `backend` ("trtllm-gen" or "cute-dsl") without the capability
    check: for a kernel path that resolved it once (kernels/paths.py)."""
    bsz, heads, rank_r = q_latent.shape
    page_size = kv_cache.shape[1]
    if bsz == 0 or page_table.shape[1] == 0:  # no row can hold a token: nothing to launch
        out = torch.zeros(bsz, heads, rank_r, dtype=q_latent.dtype, device=q_latent.device)
        lse = torch.full((bsz, heads), float("-inf"), dtype=torch.float32, device=q_latent.device)
        return out, lse
    fi = _flashinfer()
    device = q_latent.device
    bound = page_table.shape[1] * page_size if max_seq_len is None else int(max_seq_len)
    extra = {}
    if backend == "trtllm-gen":
        extra["multi_ctas_kv_counter_buffer"] = _counter_buffer(fi, device, bsz, heads)
    out, lse = fi.decode.trtllm_batch_decode_with_kv_cache_mla(
        query=torch.cat([q_latent, q_rope], dim=-1).unsqueeze(1),
        kv_cache=kv_cache,
        workspace_buffer=_workspace(backend, device),
        qk_nope_head_dim=QK_NOPE_HEAD_DIM,
        kv_lora_rank=rank_r,
        qk_rope_head_dim=q_rope.shape[-1],
        block_tables=block_table_for_kernel(page_table, page_size),
        seq_lens=seq_lens.to(torch.int32),
        max_seq_len=max(1, bound),
        bmm1_scale=float(scale),
        bmm2_scale=1.0,
        backend=backend,
        return_lse=True,
        return_lse_base=KERNEL_LSE_BASE,
        **extra,
    )
    lse = _natural_from_base2(lse.reshape(bsz, heads))  # the one base conversion (KERNEL_LSE_BASE)
    return _zero_empty_rows(out.reshape(bsz, heads, rank_r).to(q_latent.dtype), lse, seq_lens)
