"""GPU library fast paths for partial decode attention that return an LSE.

STATUS: written against the real APIs but NOT VERIFIED ON GPU YET (developed on a CPU-only
machine without flashinfer / sgl-kernel installed). Every entry point sits behind an
`*_available()` check that returns False unless CUDA and the library import; callers must fall
back to Triton otherwise. First GPU run must compare each against kernels/reference.py.

LSE bases (checked in SGLang 0.5.23's sglang/srt/layers/dcp/comm.py, docstring of
cp_lse_ag_out_rs_mla: "FlashInfer MLA returns base-2 LSE, while FlashMLA returns natural-log
LSE"; flashinfer's state merge computes lse = m * log2(e) + log2(d), i.e. base 2, for its
decode kernels too):
- flashinfer BatchDecodeWithPagedKVCacheWrapper.run(..., return_lse=True): base 2 -> lse2 * ln 2;
- flashinfer mla.BatchMLAPagedAttentionWrapper.run(..., return_lse=True): base 2 -> lse2 * ln 2;
- sgl-kernel flash_mla_with_kvcache (FlashMLA): natural log already, no conversion.
Each conversion happens exactly once, in _natural_from_base2.

Empty rows (seq_len 0): libraries disagree (flashinfer wants >= 1 page, FlashMLA reports +inf),
so the wrappers overwrite them with out 0 / lse -inf, our contract.

FP8 KV pages (kernels/kv_quant.py): flashinfer's paged decode takes an fp8 cache (kv_data_type)
with fp16/bf16 queries and per-tensor k_scale / v_scale in run(), as SGLang's flashinfer
backend calls it: passed through. The MLA libraries here are offered bf16/fp16 pages only
(FlashMLA's fp8 path wants fp8 queries and descales; flashinfer MLA is not wired for fp8 here):
their availability checks say no for fp8 pages, so "auto" takes the Triton kernel, which reads
fp8 pages itself.

Plans are rebuilt per call here for simplicity; production should plan once per decode step and
reuse the wrapper across layers (plans depend only on page_table / seq_lens).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
_WORKSPACE_BYTES = 128 * 1024 * 1024
_workspaces: dict[torch.device, torch.Tensor] = {}

try:  # import-guarded: neither library exists on CPU-only installs
    import flashinfer  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flashinfer = None

try:
    from sgl_kernel.flash_mla import flash_mla_with_kvcache, get_mla_metadata  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001
    flash_mla_with_kvcache = get_mla_metadata = None


def _natural_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """The single base-2 -> natural-log conversion: lse = lse2 * ln 2."""
    return lse2.float() * LN2


def _cuda(*tensors: torch.Tensor) -> bool:
    return torch.cuda.is_available() and all(t.is_cuda for t in tensors)


def _on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def flashinfer_gqa_fits(device, q_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int,
                        value_dim: int) -> bool:
    """flashinfer paged decode runs on `device` for these inputs: CUDA, fp16/bf16 q, pages in q's
    dtype or fp8 e4m3/e5m2, Dv == D, D in its compiled set (64, 128, 256)."""
    return (
        flashinfer is not None
        and _on_cuda(device)
        and q_dtype in (torch.float16, torch.bfloat16)
        and kv_dtype in (q_dtype, torch.float8_e4m3fn, torch.float8_e5m2)
        and value_dim == head_dim
        and head_dim in (64, 128, 256)
    )


def flashinfer_mla_fits(device, q_dtype: torch.dtype, kv_dtype: torch.dtype, rank: int, rope_dim: int) -> bool:
    """flashinfer MLA: CUDA, fp16/bf16 (pages too: no fp8 here), DeepSeek dims R = 512, Dr = 64."""
    return (
        flashinfer is not None
        and _on_cuda(device)
        and q_dtype in (torch.float16, torch.bfloat16)
        and kv_dtype == q_dtype
        and (rank, rope_dim) == (512, 64)
    )


def flashmla_fits(device, q_dtype: torch.dtype, kv_dtype: torch.dtype, rank: int, rope_dim: int,
                  page_size: int) -> bool:
    """sgl-kernel FlashMLA: CUDA (Hopper), bf16/fp16 (pages too: no fp8 here), R = 512, Dr = 64,
    page size 64."""
    return (
        flash_mla_with_kvcache is not None
        and _on_cuda(device)
        and q_dtype in (torch.float16, torch.bfloat16)
        and kv_dtype == q_dtype
        and (rank, rope_dim, page_size) == (512, 64, 64)
    )


def flashinfer_gqa_available(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """flashinfer_gqa_fits for these tensors (all on one CUDA device, k and v pages of one dtype)."""
    return (_cuda(q, k_cache, v_cache) and k_cache.dtype == v_cache.dtype
            and flashinfer_gqa_fits(q.device, q.dtype, k_cache.dtype, q.shape[-1], v_cache.shape[-1])
            and k_cache.shape[-1] == q.shape[-1])


def flashinfer_mla_available(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """flashinfer_mla_fits for these tensors."""
    return _cuda(q_latent, q_rope, kv_cache) and flashinfer_mla_fits(
        q_latent.device, q_latent.dtype, kv_cache.dtype, q_latent.shape[-1], q_rope.shape[-1])


def flashmla_available(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """flashmla_fits for these tensors."""
    return _cuda(q_latent, q_rope, kv_cache) and flashmla_fits(
        q_latent.device, q_latent.dtype, kv_cache.dtype, q_latent.shape[-1], q_rope.shape[-1],
        kv_cache.shape[1])


def available() -> bool:
    """True if any GPU library path could run on this machine."""
    return torch.cuda.is_available() and (flashinfer is not None or flash_mla_with_kvcache is not None)


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


def _csr_pages(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int):
    """Dense page table -> flashinfer CSR: indptr [B + 1], indices [nnz], last_page_len [B].

    Empty requests get 0 pages; last_page_len is clamped to [1, P] as flashinfer requires and
    their output is overwritten afterwards. Boolean indexing syncs the host: plan-time work.
    """
    lens = seq_lens.to(torch.int32)
    n_pages = (lens + page_size - 1) // page_size
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    indices = page_table[cols[None, :] < n_pages[:, None]].to(torch.int32)
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=lens.device)
    indptr[1:] = torch.cumsum(n_pages, 0)
    last = (lens - (n_pages - 1).clamp_min(0) * page_size).clamp(1, page_size).to(torch.int32)
    return indptr, indices, last


def _zero_empty_rows(out: torch.Tensor, lse: torch.Tensor, seq_lens: torch.Tensor):
    """Enforce out 0 / lse -inf for requests with no local token."""
    empty = seq_lens == 0
    out = out.masked_fill(empty[:, None, None], 0)
    lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


def gqa_partial_flashinfer(q, k_cache, v_cache, page_table, seq_lens, scale, k_scale: float = 1.0,
                           v_scale: float = 1.0):
    """flashinfer paged decode with return_lse. Shapes as reference.gqa_partial_ref (NHD layout:
    k_cache [num_pages, P, Kh, D]; fp8 pages with per-tensor k_scale / v_scale).
    Returns out [B, Hq, D] in q.dtype, lse [B, Hq] fp32 natural."""
    page_size, kh, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(q.device), "NHD")
    indptr, indices, last = _csr_pages(page_table, seq_lens, page_size)
    wrapper.plan(
        indptr, indices, last,
        q.shape[1], kh, d, page_size,
        pos_encoding_mode="NONE",
        q_data_type=q.dtype,
        kv_data_type=k_cache.dtype,
        sm_scale=scale,
    )
    scales = {name: value for name, value in (("k_scale", k_scale), ("v_scale", v_scale)) if value != 1.0}
    out, lse2 = wrapper.run(q, (k_cache, v_cache), return_lse=True, **scales)
    return _zero_empty_rows(out, _natural_from_base2(lse2), seq_lens)


def mla_partial_flashinfer(q_latent, q_rope, kv_cache, page_table, seq_lens, scale):
    """flashinfer MLA paged decode with return_lse (absorbed form).

    kv_cache [num_pages, P, R + Dr] is passed as the two strided views ckv [.., :R] and
    kpe [.., R:], as SGLang's flashinfer_mla backend does. Returns out [B, H, R], lse [B, H].
    """
    bsz, heads, rank_r = q_latent.shape
    page_size = kv_cache.shape[1]
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(_workspace(q_latent.device), backend="auto")
    kv_indptr, kv_indices, _ = _csr_pages(page_table, seq_lens, page_size)
    qo_indptr = torch.arange(bsz + 1, dtype=torch.int32, device=q_latent.device)
    wrapper.plan(
        qo_indptr, kv_indptr, kv_indices, seq_lens.to(torch.int32),
        heads, rank_r, q_rope.shape[-1], page_size,
        False,  # causal: one decode token sees its whole context
        scale,
        q_latent.dtype,
        kv_cache.dtype,
    )
    out, lse2 = wrapper.run(
        q_latent, q_rope, kv_cache[..., :rank_r], kv_cache[..., rank_r:], return_lse=True
    )
    return _zero_empty_rows(out, _natural_from_base2(lse2), seq_lens)


def mla_partial_flashmla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale):
    """sgl-kernel FlashMLA decode (natural-log LSE, no conversion). Page size must be 64.

    q is packed [B, 1, H, R + Dr]; kv_cache viewed [num_pages, 64, 1, R + Dr].
    FlashMLA returns lse [B, H, 1]; empty rows come back as +inf and are reset to -inf.
    """
    bsz, heads, rank_r = q_latent.shape
    q = torch.cat([q_latent, q_rope], dim=-1).unsqueeze(1)
    lens = seq_lens.to(torch.int32)
    metadata, num_splits = get_mla_metadata(lens, heads, 1)
    out, lse = flash_mla_with_kvcache(
        q,
        kv_cache.unsqueeze(2),
        page_table.to(torch.int32),
        lens,
        rank_r,
        metadata,
        num_splits,
        softmax_scale=scale,
        causal=False,
    )
    return _zero_empty_rows(out[:, 0], lse[:, :, 0].float(), seq_lens)
