"""Validated entry points: decode partial attention (out, lse), the LSE merge, the extend halves
(causal chunk, paged prefix partial) and the per-head value projection.

`impl` is a KernelPath (sglang_helix.kernel_path: the kernels resolved once, as HelixAttention and
the helix backends carry it) or a request name resolved on this call from these tensors ("auto",
"reference", "torch", "triton", "flashinfer"; MLA also "flashmla", "blackwell", "trtllm_mla",
"cutedsl_mla"; the merge and extend halves take "auto", "reference", "torch", "triton"): what each
name resolves to is kernel_path's module doc. GQA and MLA decode share one dispatcher.

KV pages (decode caches, extend prefix pages and chunk K/V) are in the query's dtype or fp8
(e4m3 / e5m2) with per-tensor k_scale / v_scale in SGLang's convention (kernels/kv_quant.py);
every path upcasts fp8 tiles inside the kernel. The MLA library paths take no fp8 pages
("auto" uses Triton there; asking for them by name is refused).

Every path returns out in the query's dtype (or the decode partials' out_dtype: fp32 for the
exchange) and lse fp32 natural log; rows with no local token give out 0 and lse -inf. Extend
halves return out and lse in fp32. Validation runs on every call; its one host sync (lengths vs
page-table capacity) is skipped with check_lengths=False by callers that validated at plan time,
as HelixAttention does.
"""

from __future__ import annotations

import torch

from . import kernel_path
from .kernel_path import KernelInputs, KernelPath
from .kernels import kv_quant
from .tensor_checks import check_devices, check_tensor, validate_gqa, validate_merge, validate_mla

# ----------------------------------------------------------------------------- decode


def partial_attention_gqa(
    q, k_cache, v_cache, page_table, seq_lens, scale, impl="auto", *, check_lengths: bool = True,
    host_seq_lens=None, k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None,
):
    """Partial GQA decode attention over this rank's pages.

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv] (q's dtype,
    or fp8 pages read as k * k_scale, v * v_scale); page_table: [B, max_pages] int32/int64;
    seq_lens: [B] int32/int64 local lengths. impl: a GQA KernelPath or a request (module doc).
    Returns out [B, Hq, Dv] in out_dtype (default q.dtype) and lse [B, Hq] fp32 natural log (-inf,
    out 0 for empty). out_dtype=torch.float32 keeps the fp32 accumulation unrounded for the
    exchange (decode.py); the GPU library paths return q's dtype, upcast to it.
    check_lengths=False skips the one host-syncing check (lengths vs page-table capacity) for
    callers that validated the batch at plan time (HelixDecodeMetadata.plan); host_seq_lens
    (seq_lens as host ints, from that plan) spares the CPU torch path its loop-bound sync. The
    other paths launch static grids (page_table's width) and never read lengths on the host.
    """
    validate_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, check_lengths)
    path = _decode_path(impl, q.device, False, lambda: KernelInputs.of_gqa(q, k_cache, v_cache))
    return _partial(path, (q, k_cache, v_cache, page_table, seq_lens, scale), q.dtype, out_dtype,
                    host_seq_lens, k_scale, v_scale)


def partial_attention_mla(
    q_latent, q_rope, kv_cache, page_table, seq_lens, scale, impl="auto", *, check_lengths: bool = True,
    host_seq_lens=None, k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None,
):
    """Partial absorbed-MLA decode attention over this rank's pages.

    q_latent: [B, H, R]; q_rope: [B, H, Dr]; kv_cache: [num_pages, P, R + Dr] (q's dtype, or
    fp8 pages: k_scale for the scores, v_scale for the values); page_table: [B, max_pages];
    seq_lens: [B]. impl: an MLA KernelPath or a request (module doc).
    Returns out [B, H, R] in out_dtype (default q_latent.dtype) and lse [B, H] fp32 natural log.
    check_lengths, host_seq_lens, out_dtype: as in partial_attention_gqa.
    """
    validate_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, check_lengths)
    path = _decode_path(impl, q_latent.device, True, lambda: KernelInputs.of_mla(q_latent, q_rope, kv_cache))
    return _partial(path, (q_latent, q_rope, kv_cache, page_table, seq_lens, scale), q_latent.dtype,
                    out_dtype, host_seq_lens, k_scale, v_scale)


def _decode_path(impl, device: torch.device, mla: bool, inputs) -> KernelPath:
    """impl as a KernelPath of the right kind; a request name is resolved here, from `inputs()`."""
    if isinstance(impl, KernelPath):
        if impl.mla != mla:
            raise ValueError(f"{'an MLA' if impl.mla else 'a GQA'} KernelPath ({impl.describe()}) passed to "
                             f"the {'MLA' if mla else 'GQA'} decode entry point: resolve it with mla={mla}")
        return impl
    kernel_path.check_request(impl, kernel_path.MLA_REQUESTS if mla else kernel_path.GQA_REQUESTS)
    return kernel_path.resolve_kernel_path(impl, device, mla=mla, inputs=inputs())


def _partial(path: KernelPath, args: tuple, q_dtype, out_dtype, host_seq_lens, k_scale, v_scale):
    """The one decode dispatcher (GQA and MLA): args = (q..., caches..., page_table, seq_lens, scale)."""
    return path.run_decode(*args, k_scale=kv_quant.check_scale("k_scale", k_scale),
                           v_scale=kv_quant.check_scale("v_scale", v_scale), out_dtype=out_dtype or q_dtype,
                           host_seq_lens=host_seq_lens)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, impl="auto"):
    """LSE-weighted merge. outs [S, B, H, Dv], lses [S, B, H] natural log ->
    out [B, H, Dv] (outs' dtype), lse [B, H] fp32. All-empty rows give 0 / -inf.
    impl: a KernelPath (its merge kernel) or a merge request (module doc)."""
    validate_merge(outs, lses)
    if isinstance(impl, KernelPath):
        return impl.run_merge(outs, lses)
    kernel_path.check_request(impl, kernel_path.MERGE_REQUESTS)
    return kernel_path.merge_kernel(kernel_path.resolve_merge(impl, outs.device))(outs, lses)


def merge_state(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                impl="auto"):
    """LSE merge of two partials: out [T, H, Dv], lse [T, H] each -> (out [T, H, Dv] fp32-or-out
    dtype as merge_partials, lse [T, H] fp32). impl: as merge_partials."""
    return merge_partials(torch.stack([out_a, out_b.to(out_a.dtype)]),
                          torch.stack([lse_a.float(), lse_b.float()]), impl)


def project_values(out: torch.Tensor, w_uv: torch.Tensor, dtype: torch.dtype | None = None):
    """MLA's per-head value projection of partial (or merged) latent outputs.

    out [T, H, R] (fp32 partials included), w_uv [H, R, Dv] (W_UV of the same H heads) ->
    [T, H, Dv] in `dtype` (default out's), contiguous; the LSE is untouched. The LSE merge is a
    per-(row, head) weighted sum, so projecting every partial before the merge equals projecting
    the merged latent (docs/math.md section 4). The bmm runs in W_UV's dtype (an fp32 partial
    is rounded to it once, as a latent exchange in that dtype would round it).
    """
    check_tensor("out", out, 3, "[T, H, R]")
    check_tensor("w_uv", w_uv, 3, "[H, R, Dv]")
    if tuple(w_uv.shape[:2]) != tuple(out.shape[1:]):
        raise ValueError(f"w_uv must be [H, R, Dv] = [{out.shape[1]}, {out.shape[2]}, Dv] for out "
                         f"{tuple(out.shape)}, got {tuple(w_uv.shape)}")
    check_devices(out=out, w_uv=w_uv)
    values = torch.bmm(out.transpose(0, 1).to(w_uv.dtype), w_uv).transpose(0, 1)
    return values.to(dtype or out.dtype).contiguous()


def _extend_kernels(impl, q: torch.Tensor, *kv: torch.Tensor):
    """(chunk, prefix) kernels of a KernelPath, or of a request resolved for these tensors."""
    if isinstance(impl, KernelPath):
        return impl.run_chunk, impl.run_prefix
    kernel_path.check_request(impl, kernel_path.EXTEND_REQUESTS)
    contiguous = all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (q, *kv))
    return kernel_path.extend_kernels(kernel_path.resolve_extend(
        impl, q.device, q_dtype=q.dtype, kv_dtypes=tuple(t.dtype for t in kv), contiguous=contiguous))


def chunk_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extend_lens, scale: float,
                        impl="auto", *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Causal attention of each request's chunk over the chunk itself, with the LSE.

    q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (Hq % Hk == 0; k / v in q's dtype, or fp8 read as
    k * k_scale, v * v_scale); requests back to back with lengths extend_lens (host ints);
    token i of a request sees its tokens 0..i.
    Returns out [T, Hq, Dv] fp32 and lse [T, Hq] fp32 natural log. impl: module doc.
    """
    check_tensor("q", q, 3, "[T, Hq, D]")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"chunk attention needs q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] with "
                         f"Hq % Hk == 0; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if sum(extend_lens) != q.shape[0]:
        raise ValueError(f"extend_lens sum to {sum(extend_lens)} but q has {q.shape[0]} rows")
    chunk, _ = _extend_kernels(impl, q, k, v)
    return chunk(q, k, v, extend_lens, scale, k_scale=kv_quant.check_scale("k_scale", k_scale),
                 v_scale=kv_quant.check_scale("v_scale", v_scale))


def prefix_attention_lse(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, plan,
                         scale: float, impl="auto", *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Partial attention of every chunk query over this rank's pages of its request's prefix.

    q [T, Hq, D]; k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv] (q's dtype, or fp8
    pages read tile by tile as k * k_scale, v * v_scale); plan: an
    metadata.ExtendPlan (extend_lens, local_prefix_lens, page_table [B, pages] local slots).
    Each request's local prefix pages are read once per query tile, not once per query.
    Returns out [T, Hq, Dv] fp32 (0 where this rank holds no prefix token) and lse [T, Hq] fp32
    (-inf there). impl: module doc.
    """
    _, prefix = _extend_kernels(impl, q, k_pages, v_pages)
    return prefix(q, k_pages, v_pages, plan.page_table, plan.extend_lens, plan.local_prefix_lens, scale,
                  k_scale=kv_quant.check_scale("k_scale", k_scale), v_scale=kv_quant.check_scale("v_scale", v_scale))
