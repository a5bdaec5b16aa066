"""Helix extend (prefill, chunked prefill, prefill over a cached radix prefix): one algorithm for
GQA and absorbed MLA.

Every rank has the chunk's new K/V (GQA: of its TPA group's KV heads; MLA: the latent), but a
cached prefix lives on its KVP page owners. On KVP rank d, which keeps query-head slice d of
Hn = Hq / KVP heads after the exchange:

1. causal attention of the chunk over itself, for its own Hn heads only (with its LSE); a draft
   tree's verify chunk attends under its tree mask instead (plan.chunk_masks, spec_tree);
2. without any cached prefix in the batch, that is the answer: no exchange;
3. otherwise the partial of all Hq query heads over this rank's pages of each request's prefix
   (with its LSE; -inf where the rank holds none), LSE-merged with (1) on the own head slice,
   then one exchange in the KVP group merges every rank's partials into [T, Hn, Dv].

FP8 KV (kernels/kv_quant.py): k_new / v_new and the pages may be fp8 with per-tensor k_scale /
v_scale; the kernels upcast tile by tile, and the exchange moves fp32 partials by default (rounded
to q's dtype once, after the merge: docs/math.md section 4), never fp8.

No prefix KV moves between ranks; the same collectives run on every rank (the branch depends
only on host ints every rank shares). Hq/Hk: GQA H/TPA query and K/TPA KV heads; MLA H query
heads and one latent KV head whose first R dims are the values.

MLA value exchange (w_uv [Hq, R, Dv], W_UV of all heads): (1) is projected with its own heads'
W_UV and (3) with all of them before the merge and the exchange (both are per-(row, head)
weighted sums, which commute with a per-head linear map), so the exchange moves Dv-wide values
and the result is [T, Hn, Dv] values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import chunk_attention_lse, merge_state, prefix_attention_lse, project_values
from .kernel_path import KernelPath
from .metadata import ExtendPlan
from .spec_tree import tree_chunk_attention_lse

Exchange = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def own_heads(kvp_rank: int, heads_per_rank: int) -> slice:
    """Query heads (of the Hq a rank computes) that KVP rank `kvp_rank` keeps after the exchange."""
    return slice(kvp_rank * heads_per_rank, (kvp_rank + 1) * heads_per_rank)


def own_kv(k: torch.Tensor, v: torch.Tensor, own: slice, num_q_heads: int):
    """K/V heads read by the query heads `own`: (k [T, Hk', D], v [T, Hk', Dv]) with
    Hk' dividing |own| so the grouped kernels apply (a slice, or one head per query head)."""
    kh = k.shape[1]
    group = num_q_heads // kh
    count = own.stop - own.start
    if kh == 1 or (own.start % group == 0 and count % group == 0):
        sel = slice(own.start // group, own.stop // group) if kh > 1 else slice(0, 1)
        return k[:, sel], v[:, sel]
    idx = torch.arange(own.start, own.stop, device=k.device) // group
    return k[:, idx], v[:, idx]


def helix_extend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: ExtendPlan,
                 k_pages: torch.Tensor, v_pages: torch.Tensor, scale: float, *, kvp_rank: int,
                 heads_per_rank: int, exchange: Exchange, w_uv=None,
                 kernels: KernelPath | str = "auto", k_scale: float = 1.0, v_scale: float = 1.0,
                 partial_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One chunk's attention on KVP rank `kvp_rank`; returns [T, Hn, Dv] in q's dtype.

    q [T, Hq, D]; k_new [T, Hk, D], v_new [T, Hk, Dv]: the chunk's rows, requests back to back
    as plan.extend_lens; k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv]: this rank's
    paged cache (plan.page_table indexes it); exchange(out [T, Hq, Dv], lse [T, Hq]) ->
    merged [T, Hn, Dv] over the KVP group (sglang_helix.comm). w_uv [Hq, Dv, Dv']: optional
    per-head value projection (MLA's W_UV, module doc); the result is then [T, Hn, Dv'].
    kernels: the rank's KernelPath (its chunk and prefix kernels), or an extend request resolved
    per half from these tensors ("auto", "torch", "triton", "reference"; sglang_helix.kernel_path).
    k_scale / v_scale: per-tensor scales of fp8 K/V (the chunk's and the pages'); 1 otherwise.
    partial_dtype: the dtype the partials travel in (comm.partial_dtype; fp32 by default).
    """
    own = own_heads(kvp_rank, heads_per_rank)
    k_own, v_own = own_kv(k_new, v_new, own, q.shape[1])
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if plan.chunk_masks is None:
        chunk_out, chunk_lse = chunk_attention_lse(q[:, own], k_own, v_own, plan.extend_lens, scale,
                                                   kernels, **scales)
    else:  # a draft tree's verify: the chunk attends under the tree mask (spec_tree)
        chunk_out, chunk_lse = tree_chunk_attention_lse(q[:, own], k_own, v_own, plan.chunk_masks,
                                                        scale, **scales)
    if w_uv is not None:
        chunk_out = project_values(chunk_out, w_uv[own])
    if not plan.has_prefix:
        return chunk_out.to(q.dtype)
    out, lse = prefix_attention_lse(q, k_pages, v_pages, plan, scale, kernels, **scales)
    if w_uv is not None:
        out = project_values(out, w_uv)
    out[:, own], lse[:, own] = merge_state(out[:, own], lse[:, own], chunk_out, chunk_lse, kernels)
    return exchange(out.to(partial_dtype).contiguous(), lse.contiguous()).to(q.dtype)
