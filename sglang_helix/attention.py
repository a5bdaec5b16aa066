"""Validated entry points + dispatch: decode partial attention (out, lse), the LSE merge,
the extend halves (causal chunk, paged prefix partial) and the per-head value projection.

`impl` picks the implementation:
- "auto": a GPU library (flashinfer / FlashMLA) if available for these inputs, else Triton on
  CUDA, else the torch fast path on CPU;
- "reference": fp32 loop from kernels/reference.py (slow, the ground truth);
- "torch": vectorised torch path (kernels/torch_decode.py), any device;
- "triton": Triton kernels; on CPU only under TRITON_INTERPRET=1 (tests);
- "flashinfer": flashinfer library kernels (CUDA; not verified on GPU yet);
- MLA only, "trtllm_mla" / "cutedsl_mla" / "blackwell" (either): flashinfer's Blackwell MLA
  decode (kernels/blackwell.py; compute capability 10, bf16; not verified on GPU yet). "auto"
  picks it first wherever blackwell.blackwell_mla_available says it runs.
The extend halves (`chunk_attention_lse`, `prefix_attention_lse`) take "auto" (Triton on CUDA,
torch on CPU), "torch" (kernels/torch_extend.py), "triton" (kernels/triton_extend.py) or
"reference"; they return out and lse in fp32.

KV pages (decode caches, extend prefix pages and chunk K/V) are in the query's dtype or fp8
(e4m3 / e5m2) with per-tensor k_scale / v_scale in SGLang's convention (kernels/kv_quant.py);
every path upcasts fp8 tiles inside the kernel. The MLA library paths take no fp8 pages
("auto" uses Triton there; asking for them by name is refused).

Every impl returns out in the query's dtype (or the decode partials' out_dtype: fp32 for the
exchange) and lse fp32 natural log; rows with no local token
give out 0 and lse -inf. Validation runs on every call; its one host sync (lengths vs page-table capacity) is skipped
with check_lengths=False by callers that validated at plan time, as HelixAttention does.
"""

from __future__ import annotations

import os

import torch

from .kernels import blackwell, gpu, kv_quant, reference, torch_decode, torch_extend
from .validation import (_FLOAT_DTYPES, _check_devices, _check_float, _check_kv, _check_last_contiguous,
                         _check_tensor, _validate_gqa, _validate_merge, _validate_mla)

IMPLS = ("auto", "reference", "torch", "triton", "flashinfer")
MLA_IMPLS = IMPLS + blackwell.IMPLS
MERGE_IMPLS = ("auto", "reference", "torch", "triton")
EXTEND_IMPLS = ("auto", "reference", "torch", "triton")

# ----------------------------------------------------------------------------- dispatch


def _check_impl(impl, choices) -> None:
    if impl not in choices:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {', '.join(map(repr, choices))}")


def _triton_ok(device: torch.device) -> None:
    """Raise unless Triton can run on `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return
    from .kernels import triton_decode  # noqa: PLC0415 - import only when Triton is asked for

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' on {device} needs TRITON_INTERPRET=1 (interpreter, tests only); "
            f"use impl='torch' on CPU"
        )
    if not triton_decode.INTERPRETED:
        raise ValueError(
            "impl='triton' on CPU: TRITON_INTERPRET=1 must be set before sglang_helix.kernels "
            "is first imported (triton.jit reads it at decoration)"
        )


def _resolve(impl: str, device: torch.device, gpu_ok: bool, blackwell_ok: bool = False) -> str:
    if impl != "auto":
        return impl
    if blackwell_ok:  # MLA on a compute-capability-10 GPU (kernels/blackwell.py)
        return "blackwell"
    if gpu_ok:
        return "flashinfer"
    return "triton" if device.type == "cuda" else "torch"


def partial_attention_gqa(
    q, k_cache, v_cache, page_table, seq_lens, scale, impl="auto", *, check_lengths: bool = True,
    host_seq_lens=None, k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None,
):
    """Partial GQA decode attention over this rank's pages.

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv] (q's dtype,
    or fp8 pages read as k * k_scale, v * v_scale); page_table: [B, max_pages] int32/int64;
    seq_lens: [B] int32/int64 local lengths.
    Returns out [B, Hq, Dv] in out_dtype (default q.dtype) and lse [B, Hq] fp32 natural log (-inf,
    out 0 for empty). out_dtype=torch.float32 keeps the fp32 accumulation unrounded for the
    exchange (decode.py); the GPU library paths return q's dtype, upcast to it.
    check_lengths=False skips the one host-syncing check (lengths vs page-table capacity) for
    callers that validated the batch at plan time (HelixDecodeMetadata.plan); host_seq_lens
    (seq_lens as host ints, from that plan) spares the CPU torch path its loop-bound sync. The
    other paths launch static grids (page_table's width) and never read lengths on the host.
    """
    _check_impl(impl, IMPLS)
    _validate_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, check_lengths)
    args = (q, k_cache, v_cache, page_table, seq_lens, scale)
    scales = dict(k_scale=kv_quant.check_scale("k_scale", k_scale),
                  v_scale=kv_quant.check_scale("v_scale", v_scale))
    out_dtype = out_dtype or q.dtype
    chosen = _resolve(impl, q.device, gpu.flashinfer_gqa_available(q, k_cache, v_cache))
    if chosen == "reference":
        out, lse = reference.gqa_partial_ref(*args, **scales)
        return out.to(out_dtype), lse
    if chosen == "torch":
        return torch_decode.gqa_partial_torch(*args, host_seq_lens=host_seq_lens, out_dtype=out_dtype,
                                              **scales)
    if chosen == "triton":
        _triton_ok(q.device)
        from .kernels.triton_decode import gqa_partial_triton  # noqa: PLC0415

        return gqa_partial_triton(*args, out_dtype=out_dtype, **scales)
    if not gpu.flashinfer_gqa_available(q, k_cache, v_cache):
        raise ValueError(
            "impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16 q, pages in q's "
            "dtype or fp8 e4m3/e5m2, Dv == D in (64, 128, 256); use impl='triton' or 'auto'"
        )
    out, lse = gpu.gqa_partial_flashinfer(*args, **scales)
    return out.to(out_dtype), lse


def partial_attention_mla(
    q_latent, q_rope, kv_cache, page_table, seq_lens, scale, impl="auto", *, check_lengths: bool = True,
    host_seq_lens=None, k_scale: float = 1.0, v_scale: float = 1.0, out_dtype=None,
):
    """Partial absorbed-MLA decode attention over this rank's pages.

    q_latent: [B, H, R]; q_rope: [B, H, Dr]; kv_cache: [num_pages, P, R + Dr] (q's dtype, or
    fp8 pages: k_scale for the scores, v_scale for the values); page_table: [B, max_pages];
    seq_lens: [B].
    Returns out [B, H, R] in out_dtype (default q_latent.dtype) and lse [B, H] fp32 natural log.
    check_lengths, host_seq_lens, out_dtype: as in partial_attention_gqa.
    """
    _check_impl(impl, MLA_IMPLS)
    _validate_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, check_lengths)
    args = (q_latent, q_rope, kv_cache, page_table, seq_lens, scale)
    scales = dict(k_scale=kv_quant.check_scale("k_scale", k_scale),
                  v_scale=kv_quant.check_scale("v_scale", v_scale))
    if kv_quant.is_fp8(kv_cache.dtype) and impl in ("flashinfer",) + blackwell.IMPLS:
        raise ValueError(f"impl={impl!r} reads bf16/fp16 MLA pages only, got {kv_cache.dtype} "
                         f"(--kv-cache-dtype fp8_*): use impl='triton' or 'auto' (the Triton kernel "
                         f"reads fp8 pages), or serve with --kv-cache-dtype auto")
    bw = blackwell.choose_backend(q_latent, q_rope, kv_cache) if impl == "auto" else None
    fi_ok = gpu.flashinfer_mla_available(q_latent, q_rope, kv_cache)
    out_dtype = out_dtype or q_latent.dtype
    if impl == "auto" and bw is None and not fi_ok and gpu.flashmla_available(q_latent, q_rope, kv_cache):
        out, lse = gpu.mla_partial_flashmla(*args)
        return out.to(out_dtype), lse
    chosen = _resolve(impl, q_latent.device, fi_ok, blackwell_ok=bw is not None)
    if chosen in blackwell.IMPLS:  # raises, naming the requirement, where it cannot run
        out, lse = blackwell.mla_partial_blackwell(*args, backend=bw or chosen)
        return out.to(out_dtype), lse
    if chosen == "reference":
        out, lse = reference.mla_partial_ref(*args, **scales)
        return out.to(out_dtype), lse
    if chosen == "torch":
        return torch_decode.mla_partial_torch(*args, host_seq_lens=host_seq_lens, out_dtype=out_dtype,
                                              **scales)
    if chosen == "triton":
        _triton_ok(q_latent.device)
        from .kernels.triton_decode import mla_partial_triton  # noqa: PLC0415

        return mla_partial_triton(*args, out_dtype=out_dtype, **scales)
    if not fi_ok:
        raise ValueError(
            "impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16, R=512, Dr=64; "
            "use impl='triton' or 'auto'"
        )
    out, lse = gpu.mla_partial_flashinfer(*args)
    return out.to(out_dtype), lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, impl="auto"):
    """LSE-weighted merge. outs [S, B, H, Dv], lses [S, B, H] natural log ->
    out [B, H, Dv] (outs' dtype), lse [B, H] fp32. All-empty rows give 0 / -inf."""
    _check_impl(impl, MERGE_IMPLS)
    _validate_merge(outs, lses)
    chosen = impl if impl != "auto" else ("triton" if outs.is_cuda else "torch")
    if chosen == "triton":
        _triton_ok(outs.device)
        from .kernels.triton_merge import merge_triton  # noqa: PLC0415

        return merge_triton(outs, lses)
    # merge_ref is already vectorised; "torch" and "reference" share it.
    out, lse = reference.merge_ref(outs, lses)
    return out.to(outs.dtype), lse


def merge_state(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """LSE merge of two partials: out [T, H, Dv], lse [T, H] each -> (out [T, H, Dv] fp32-or-out
    dtype as merge_partials, lse [T, H] fp32)."""
    return merge_partials(torch.stack([out_a, out_b.to(out_a.dtype)]),
                          torch.stack([lse_a.float(), lse_b.float()]))


def project_values(out: torch.Tensor, w_uv: torch.Tensor, dtype: torch.dtype | None = None):
    """MLA's per-head value projection of partial (or merged) latent outputs.

    out [T, H, R] (fp32 partials included), w_uv [H, R, Dv] (W_UV of the same H heads) ->
    [T, H, Dv] in `dtype` (default out's), contiguous; the LSE is untouched. The LSE merge is a
    per-(row, head) weighted sum, so projecting every partial before the merge equals projecting
    the merged latent (docs/math.md section 4). The bmm runs in W_UV's dtype (an fp32 partial
    is rounded to it once, as a latent exchange in that dtype would round it).
    """
    _check_tensor("out", out, 3, "[T, H, R]")
    _check_tensor("w_uv", w_uv, 3, "[H, R, Dv]")
    if tuple(w_uv.shape[:2]) != tuple(out.shape[1:]):
        raise ValueError(f"w_uv must be [H, R, Dv] = [{out.shape[1]}, {out.shape[2]}, Dv] for out "
                         f"{tuple(out.shape)}, got {tuple(w_uv.shape)}")
    _check_devices(out=out, w_uv=w_uv)
    values = torch.bmm(out.transpose(0, 1).to(w_uv.dtype), w_uv).transpose(0, 1)
    return values.to(dtype or out.dtype).contiguous()


def _extend_impl(impl: str, device: torch.device, **tensors: torch.Tensor) -> str:
    """The extend halves' implementation: "auto" -> Triton on CUDA, torch elsewhere (and for
    inputs Triton does not take). Triton needs q in fp16/bf16/fp32, k/v in q's dtype or fp8, and
    contiguous last dims (views such as MLA's v = k[..., :R] are fine). q comes first."""
    _check_impl(impl, EXTEND_IMPLS)
    (first, q), *kv = tensors.items()
    fits = (q.dtype in _FLOAT_DTYPES and all(t.dtype == q.dtype or kv_quant.is_fp8(t.dtype) for _, t in kv)
            and all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in tensors.values()))
    chosen = impl if impl != "auto" else ("triton" if device.type == "cuda" and fits else "torch")
    if chosen == "triton":
        _triton_ok(device)
        _check_float(first, q)
        for name, t in tensors.items():
            if t is not q:
                _check_kv(name, t, q, first)
            _check_last_contiguous(name, t)
    return chosen


def chunk_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extend_lens, scale: float,
                        impl: str = "auto", *, k_scale: float = 1.0, v_scale: float = 1.0):
    """Causal attention of each request's chunk over the chunk itself, with the LSE.

    q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (Hq % Hk == 0; k / v in q's dtype, or fp8 read as
    k * k_scale, v * v_scale); requests back to back with lengths extend_lens (host ints);
    token i of a request sees its tokens 0..i.
    Returns out [T, Hq, Dv] fp32 and lse [T, Hq] fp32 natural log. impl: module doc.
    """
    _check_tensor("q", q, 3, "[T, Hq, D]")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"chunk attention needs q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] with "
                         f"Hq % Hk == 0; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if sum(extend_lens) != q.shape[0]:
        raise ValueError(f"extend_lens sum to {sum(extend_lens)} but q has {q.shape[0]} rows")
    chosen = _extend_impl(impl, q.device, q=q, k=k, v=v)
    ks, vs = kv_quant.check_scale("k_scale", k_scale), kv_quant.check_scale("v_scale", v_scale)
    if chosen == "triton":
        from .kernels.triton_extend import chunk_attention_triton  # noqa: PLC0415

        return chunk_attention_triton(q, k, v, extend_lens, scale, k_scale=ks, v_scale=vs)
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    start = 0
    for n in extend_lens:
        sl = slice(start, start + n)
        if chosen == "reference":
            out[sl], lse[sl] = reference.attention_lse_ref(
                q[sl], kv_quant.dequantize(k[sl], ks), kv_quant.dequantize(v[sl], vs), scale, 0)
        else:
            out[sl], lse[sl] = torch_extend.tiled_attention_lse(
                q[sl], torch_extend.dense_fetch(k[sl], v[sl]), n, v.shape[2], scale, causal_offset=0,
                k_scale=ks, v_scale=vs)
        start += n
    return out, lse


def prefix_attention_lse(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, plan,
                         scale: float, impl: str = "auto", *, k_scale: float = 1.0,
                         v_scale: float = 1.0):
    """Partial attention of every chunk query over this rank's pages of its request's prefix.

    q [T, Hq, D]; k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv] (q's dtype, or fp8
    pages read tile by tile as k * k_scale, v * v_scale); plan: an
    metadata.ExtendPlan (extend_lens, local_prefix_lens, page_table [B, pages] local slots).
    Each request's local prefix pages are read once per query tile, not once per query.
    Returns out [T, Hq, Dv] fp32 (0 where this rank holds no prefix token) and lse [T, Hq] fp32
    (-inf there). impl: module doc.
    """
    chosen = _extend_impl(impl, q.device, q=q, k_pages=k_pages, v_pages=v_pages)
    ks, vs = kv_quant.check_scale("k_scale", k_scale), kv_quant.check_scale("v_scale", v_scale)
    if chosen == "triton":
        from .kernels.triton_extend import prefix_attention_triton  # noqa: PLC0415

        return prefix_attention_triton(q, k_pages, v_pages, plan.page_table, plan.extend_lens,
                                       plan.local_prefix_lens, scale, k_scale=ks, v_scale=vs)
    page_size, dv = k_pages.shape[1], v_pages.shape[-1]
    out = torch.zeros(q.shape[0], q.shape[1], dv, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    starts = plan.starts
    for i, length in enumerate(plan.local_prefix_lens):
        if length == 0 or plan.extend_lens[i] == 0:
            continue
        sl = slice(starts[i], starts[i + 1])
        if chosen == "reference":  # this request's tokens only, dequantized
            keys = [kv_quant.dequantize(reference._gather_tokens(c, plan.page_table[i], length), s)
                    for c, s in ((k_pages, ks), (v_pages, vs))]
            out[sl], lse[sl] = reference.attention_lse_ref(q[sl], *keys, scale)
            continue
        fetch = torch_extend.paged_fetch(k_pages, v_pages, plan.page_table[i], page_size)
        out[sl], lse[sl] = torch_extend.tiled_attention_lse(q[sl], fetch, length, dv, scale,
                                                            k_multiple=page_size, k_scale=ks, v_scale=vs)
    return out, lse
