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

Every impl returns out in the query's dtype and lse fp32 natural log; rows with no local token
give out 0 and lse -inf. Validation runs on every call; its one host sync (lengths vs page-table capacity) is skipped
with check_lengths=False by callers that validated at plan time, as HelixAttention does.
"""

from __future__ import annotations

import math
import os

import torch

from .kernels import blackwell, gpu, reference, torch_decode, torch_extend

IMPLS = ("auto", "reference", "torch", "triton", "flashinfer")
MLA_IMPLS = IMPLS + blackwell.IMPLS
MERGE_IMPLS = ("auto", "reference", "torch", "triton")
EXTEND_IMPLS = ("auto", "reference", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "") -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32 (cast with .to())")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; "
            f"cast {name} to {like.dtype} (the kernels take one compute dtype)"
        )


def _check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use int32 or int64 (e.g. {name}.to(torch.int32))")


def _check_last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride(-1) == 1), got stride {t.stride()}; "
            f"pass {name}.contiguous()"
        )


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}; move them with .to(device)")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float (e.g. head_dim ** -0.5), got {scale!r}")


def _check_table(
    page_table: torch.Tensor, seq_lens: torch.Tensor, bsz: int, page_size: int, q_name: str, lengths: bool
) -> None:
    """page_table [B, max_pages], seq_lens [B], and (if `lengths`) every length fits the table."""
    _check_tensor("page_table", page_table, 2, "[B, max_pages]")
    _check_tensor("seq_lens", seq_lens, 1, "[B]")
    _check_index("page_table", page_table)
    _check_index("seq_lens", seq_lens)
    if page_table.shape[0] != bsz:
        raise ValueError(
            f"page_table has {page_table.shape[0]} rows but {q_name} has batch size B={bsz}; "
            f"one page-table row per request"
        )
    if seq_lens.shape[0] != bsz:
        raise ValueError(f"seq_lens has shape {tuple(seq_lens.shape)} but {q_name} has B={bsz}; need [B]")
    if bsz == 0 or not lengths:
        return
    lo, hi = (int(x) for x in torch.aminmax(seq_lens))  # host sync: plan-time check in production
    if lo < 0:
        raise ValueError(f"seq_lens must be >= 0, got min {lo}")
    capacity = page_table.shape[1] * page_size
    if hi > capacity:
        raise ValueError(
            f"seq_lens max {hi} exceeds page_table capacity max_pages x page_size = "
            f"{page_table.shape[1]} x {page_size} = {capacity}; widen page_table to "
            f">= {-(-hi // page_size)} columns"
        )


def _validate_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, lengths: bool) -> None:
    _check_tensor("q", q, 3, "[B, Hq, D]")
    _check_tensor("k_cache", k_cache, 4, "[num_pages, P, Kh, D]")
    _check_tensor("v_cache", v_cache, 4, "[num_pages, P, Kh, Dv]")
    _check_float("q", q)
    _check_float("k_cache", k_cache, q, "q")
    _check_float("v_cache", v_cache, q, "q")
    bsz, hq, d = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on "
            f"[num_pages, P, Kh]"
        )
    kh = k_cache.shape[2]
    if kh == 0 or hq % kh:
        raise ValueError(
            f"q has Hq={hq} heads, not divisible by Kh={kh} KV heads of k_cache; each query head "
            f"group must map to one KV head (Hq = group x Kh)"
        )
    if k_cache.shape[3] != d:
        raise ValueError(f"q head dim D={d} != k_cache head dim {k_cache.shape[3]}; they must match")
    _check_scale(scale)
    _check_devices(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_last_contiguous(name, t)
    _check_table(page_table, seq_lens, bsz, k_cache.shape[1], "q", lengths)


def _validate_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, lengths: bool) -> None:
    _check_tensor("q_latent", q_latent, 3, "[B, H, R]")
    _check_tensor("q_rope", q_rope, 3, "[B, H, Dr]")
    _check_tensor("kv_cache", kv_cache, 3, "[num_pages, P, R + Dr]")
    _check_float("q_latent", q_latent)
    _check_float("q_rope", q_rope, q_latent, "q_latent")
    _check_float("kv_cache", kv_cache, q_latent, "q_latent")
    bsz, heads, rank_r = q_latent.shape
    if q_rope.shape[:2] != (bsz, heads):
        raise ValueError(
            f"q_rope shape {tuple(q_rope.shape)} must match q_latent's [B, H] = [{bsz}, {heads}]"
        )
    width = rank_r + q_rope.shape[2]
    if kv_cache.shape[2] != width:
        raise ValueError(
            f"kv_cache last dim {kv_cache.shape[2]} != R + Dr = {rank_r} + {q_rope.shape[2]} = {width} "
            f"(latent c_kv then rotary k_pe)"
        )
    _check_scale(scale)
    _check_devices(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, page_table=page_table, seq_lens=seq_lens)
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        _check_last_contiguous(name, t)
    _check_table(page_table, seq_lens, bsz, kv_cache.shape[1], "q_latent", lengths)


def _validate_merge(outs, lses) -> None:
    _check_tensor("outs", outs, 4, "[S, B, H, Dv]")
    _check_tensor("lses", lses, 3, "[S, B, H]")
    _check_float("outs", outs)
    _check_float("lses", lses)
    if lses.shape != outs.shape[:3]:
        raise ValueError(
            f"lses shape {tuple(lses.shape)} must equal outs' [S, B, H] = {tuple(outs.shape[:3])}"
        )
    if outs.shape[0] < 1:
        raise ValueError("outs must hold at least one partial (S >= 1)")
    _check_devices(outs=outs, lses=lses)
    _check_last_contiguous("outs", outs)


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
    host_seq_lens=None,
):
    """Partial GQA decode attention over this rank's pages.

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv];
    page_table: [B, max_pages] int32/int64; seq_lens: [B] int32/int64 local lengths.
    Returns out [B, Hq, Dv] in q.dtype and lse [B, Hq] fp32 natural log (-inf, out 0 for empty).
    check_lengths=False skips the one host-syncing check (lengths vs page-table capacity) for
    callers that validated the batch at plan time (HelixDecodeMetadata.plan); host_seq_lens
    (seq_lens as host ints, from that plan) spares the CPU torch path its loop-bound sync. The
    other paths launch static grids (page_table's width) and never read lengths on the host.
    """
    _check_impl(impl, IMPLS)
    _validate_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, check_lengths)
    args = (q, k_cache, v_cache, page_table, seq_lens, scale)
    chosen = _resolve(impl, q.device, gpu.flashinfer_gqa_available(q, k_cache, v_cache))
    if chosen == "reference":
        out, lse = reference.gqa_partial_ref(*args)
        return out.to(q.dtype), lse
    if chosen == "torch":
        return torch_decode.gqa_partial_torch(*args, host_seq_lens=host_seq_lens)
    if chosen == "triton":
        _triton_ok(q.device)
        from .kernels.triton_decode import gqa_partial_triton  # noqa: PLC0415

        return gqa_partial_triton(*args)
    if not gpu.flashinfer_gqa_available(q, k_cache, v_cache):
        raise ValueError(
            "impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16, Dv == D in "
            "(64, 128, 256); use impl='triton' or 'auto'"
        )
    return gpu.gqa_partial_flashinfer(*args)


def partial_attention_mla(
    q_latent, q_rope, kv_cache, page_table, seq_lens, scale, impl="auto", *, check_lengths: bool = True,
    host_seq_lens=None,
):
    """Partial absorbed-MLA decode attention over this rank's pages.

    q_latent: [B, H, R]; q_rope: [B, H, Dr]; kv_cache: [num_pages, P, R + Dr];
    page_table: [B, max_pages]; seq_lens: [B].
    Returns out [B, H, R] in q_latent.dtype and lse [B, H] fp32 natural log.
    check_lengths, host_seq_lens: as in partial_attention_gqa.
    """
    _check_impl(impl, MLA_IMPLS)
    _validate_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, check_lengths)
    args = (q_latent, q_rope, kv_cache, page_table, seq_lens, scale)
    bw = blackwell.choose_backend(q_latent, q_rope, kv_cache) if impl == "auto" else None
    fi_ok = gpu.flashinfer_mla_available(q_latent, q_rope, kv_cache)
    if impl == "auto" and bw is None and not fi_ok and gpu.flashmla_available(q_latent, q_rope, kv_cache):
        return gpu.mla_partial_flashmla(*args)
    chosen = _resolve(impl, q_latent.device, fi_ok, blackwell_ok=bw is not None)
    if chosen in blackwell.IMPLS:  # raises, naming the requirement, where it cannot run
        return blackwell.mla_partial_blackwell(*args, backend=bw or chosen)
    if chosen == "reference":
        out, lse = reference.mla_partial_ref(*args)
        return out.to(q_latent.dtype), lse
    if chosen == "torch":
        return torch_decode.mla_partial_torch(*args, host_seq_lens=host_seq_lens)
    if chosen == "triton":
        _triton_ok(q_latent.device)
        from .kernels.triton_decode import mla_partial_triton  # noqa: PLC0415

        return mla_partial_triton(*args)
    if not fi_ok:
        raise ValueError(
            "impl='flashinfer' needs CUDA tensors, flashinfer installed, fp16/bf16, R=512, Dr=64; "
            "use impl='triton' or 'auto'"
        )
    return gpu.mla_partial_flashinfer(*args)


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
    inputs Triton does not take). Triton needs one fp16/bf16/fp32 dtype and contiguous last
    dims (views such as MLA's v = k[..., :R] are fine)."""
    _check_impl(impl, EXTEND_IMPLS)
    ts = list(tensors.values())
    fits = (all(t.dtype == ts[0].dtype for t in ts) and ts[0].dtype in _FLOAT_DTYPES
            and all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in ts))
    chosen = impl if impl != "auto" else ("triton" if device.type == "cuda" and fits else "torch")
    if chosen == "triton":
        _triton_ok(device)
        first = next(iter(tensors))
        for name, t in tensors.items():
            _check_float(name, t, tensors[first], first)
            _check_last_contiguous(name, t)
    return chosen


def chunk_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extend_lens, scale: float,
                        impl: str = "auto"):
    """Causal attention of each request's chunk over the chunk itself, with the LSE.

    q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (Hq % Hk == 0); requests back to back with
    lengths extend_lens (host ints); token i of a request sees its tokens 0..i.
    Returns out [T, Hq, Dv] fp32 and lse [T, Hq] fp32 natural log. impl: module doc.
    """
    _check_tensor("q", q, 3, "[T, Hq, D]")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"chunk attention needs q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] with "
                         f"Hq % Hk == 0; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if sum(extend_lens) != q.shape[0]:
        raise ValueError(f"extend_lens sum to {sum(extend_lens)} but q has {q.shape[0]} rows")
    chosen = _extend_impl(impl, q.device, q=q, k=k, v=v)
    if chosen == "triton":
        from .kernels.triton_extend import chunk_attention_triton  # noqa: PLC0415

        return chunk_attention_triton(q, k, v, extend_lens, scale)
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    start = 0
    for n in extend_lens:
        sl = slice(start, start + n)
        if chosen == "reference":
            out[sl], lse[sl] = reference.attention_lse_ref(q[sl], k[sl], v[sl], scale, 0)
        else:
            out[sl], lse[sl] = torch_extend.tiled_attention_lse(
                q[sl], torch_extend.dense_fetch(k[sl], v[sl]), n, v.shape[2], scale, causal_offset=0)
        start += n
    return out, lse


def prefix_attention_lse(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, plan,
                         scale: float, impl: str = "auto"):
    """Partial attention of every chunk query over this rank's pages of its request's prefix.

    q [T, Hq, D]; k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv]; plan: an
    metadata.ExtendPlan (extend_lens, local_prefix_lens, page_table [B, pages] local slots).
    Each request's local prefix pages are read once per query tile, not once per query.
    Returns out [T, Hq, Dv] fp32 (0 where this rank holds no prefix token) and lse [T, Hq] fp32
    (-inf there). impl: module doc.
    """
    chosen = _extend_impl(impl, q.device, q=q, k_pages=k_pages, v_pages=v_pages)
    if chosen == "triton":
        from .kernels.triton_extend import prefix_attention_triton  # noqa: PLC0415

        return prefix_attention_triton(q, k_pages, v_pages, plan.page_table, plan.extend_lens,
                                       plan.local_prefix_lens, scale)
    page_size, dv = k_pages.shape[1], v_pages.shape[-1]
    out = torch.zeros(q.shape[0], q.shape[1], dv, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    starts = plan.starts
    for i, length in enumerate(plan.local_prefix_lens):
        if length == 0 or plan.extend_lens[i] == 0:
            continue
        sl = slice(starts[i], starts[i + 1])
        if chosen == "reference":
            keys = [reference._gather_tokens(c, plan.page_table[i], length) for c in (k_pages, v_pages)]
            out[sl], lse[sl] = reference.attention_lse_ref(q[sl], *keys, scale)
            continue
        fetch = torch_extend.paged_fetch(k_pages, v_pages, plan.page_table[i], page_size)
        out[sl], lse[sl] = torch_extend.tiled_attention_lse(q[sl], fetch, length, dv, scale,
                                                            k_multiple=page_size)
    return out, lse
