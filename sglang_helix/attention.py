"""Partial decode attention (out, lse) and the LSE merge: validated entry points + dispatch.

`impl` picks the implementation: "reference" (fp32 loop), and more added by kernels/.
"""

from __future__ import annotations

import torch

from .kernels import reference


def partial_attention_gqa(q, k_cache, v_cache, page_table, seq_lens, scale, impl="reference"):
    """Partial GQA decode attention over this rank's pages.

    q: [B, Hq, D]; k_cache: [num_pages, P, Kh, D]; v_cache: [num_pages, P, Kh, Dv];
    page_table: [B, max_pages] int32; seq_lens: [B] int32 local lengths.
    Returns out [B, Hq, Dv] and lse [B, Hq] fp32 natural log (-inf, out 0 for empty shards).
    """
    return reference.gqa_partial_ref(q, k_cache, v_cache, page_table, seq_lens, scale)


def partial_attention_mla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, impl="reference"):
    """Partial absorbed-MLA decode attention over this rank's pages.

    q_latent: [B, H, R]; q_rope: [B, H, Dr]; kv_cache: [num_pages, P, R + Dr].
    Returns out [B, H, R] and lse [B, H] fp32.
    """
    return reference.mla_partial_ref(q_latent, q_rope, kv_cache, page_table, seq_lens, scale)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, impl="reference"):
    """outs [S, B, H, Dv], lses [S, B, H] -> out [B, H, Dv] (outs' dtype), lse [B, H] fp32."""
    out, lse = reference.merge_ref(outs, lses)
    return out.to(outs.dtype), lse
