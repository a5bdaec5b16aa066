"""The attention side of one decode layer on one GPU, per layout family: input projections,
attention over the GPU's KV shard, the query all-gather and the partial exchange, W_UV, o_proj;
and the linear-attention (Gated DeltaNet) layers of hybrid models. Seconds per layer; `tok` =
requests whose attention this GPU computes (numpy array over batch sizes).

Per family (H heads, K KV heads, S context, T TP, D DCP, N = KVP x TPA):

| family | q heads projected | heads attended | KV tokens | KV heads held | exchange |
| --- | --- | --- | --- | --- | --- |
| tp / pp / dpa | H/T | H/T | S | ceil(K/T) | none |
| kvp (Medha) | H/T | H/T | S/KVP | ceil(K/T) | AG LSE + fp32 all-reduce |
| dcp | H/T (+ AG of q over D), or H*D/T (qrep) | H*D/T | S/D | ceil(K/(T/D)) | a2a / ag_rs / fi_a2a (MLA); AG LSE + fp32 all-reduce (SGLang GQA) |
| helix | H/TPA | H/TPA | S/KVP | K/TPA | one a2a (or ag_rs) of fp32 or bf16 partials, HOP-B |

SGLang's DCP exchange moves the partials in the output dtype (bf16) with fp32 LSE (a2a, fi_a2a)
or fp32 partials (ag_rs: reduce-scatter; GQA triton: all-reduce of all H*D/T heads, then a head
slice); vLLM's moves bf16 partials (ag_rs: reduce-scatter, or a2a). Helix moves what
--helix-exchange-dtype says (fp32 default). MLA exchanges the 512-wide latent, or, Helix with
value, W_UV's 128-wide output (W_UV then replicated for the rank's H/TPA heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .collectives import all_gather, all_reduce, all_to_all, hopb_overlap, kernel, reduce_scatter, split
from .layouts import Layout
from .specs import ACT_BYTES, LSE_BYTES, STATE_BYTES


@dataclass(frozen=True)
class Phase:
    """Seconds (arrays over batch sizes) and weights held (elements) of one phase on one GPU."""

    time: np.ndarray
    exchange: np.ndarray  # q all-gather + partial exchange alone (before any overlap)
    core: np.ndarray  # attention over the KV shard alone
    params: float


def kv_ranks(lay: Layout) -> int:
    """Ranks the KV heads are split over (kv_size.KVShape.elems_per_token's `ranks`)."""
    return lay.tpa // lay.kvp if lay.kind == "dcp" else lay.tpa


def attended_heads(model, lay: Layout) -> float:
    """Query heads whose attention one GPU computes."""
    if lay.kind == "dcp":
        return model.num_heads * lay.kvp / lay.tpa
    return model.num_heads / lay.tpa


def projected_q_heads(model, lay: Layout) -> float:
    """Query heads one GPU projects (Helix and DCP qrep: those it attends, no gather)."""
    if lay.kind == "dcp" and not lay.qrep:
        return model.num_heads / lay.tpa
    return attended_heads(model, lay)


def kv_elems(model, lay: Layout) -> int:
    """Cached elements per token per layer on one GPU (kv_size: KV heads duplicated once the
    head split exceeds K; MLA's latent on every rank)."""
    return model.kv_shape.elems_per_token(kv_ranks(lay))


def weight_units(st, params):
    """Projection params held, counted in units of the weights' dtype (the step's memory
    multiplies every layer's params by that dtype's bytes)."""
    return params * st.proj_wbytes / st.wbytes


def input_projections(st, lay: Layout, tok):
    """(seconds, params held): MLA q_a/kv_a whole, q_b (+ W_UK) or q (+ gate) per projected
    head, GQA K/V per KV head held."""
    m = st.model
    kv_heads = 0 if m.mla else m.kv_shape.heads_per_rank(kv_ranks(lay))
    params = (m.attn_shared_params + projected_q_heads(m, lay) * m.q_params_per_head
              + kv_heads * m.kv_params_per_head)
    return kernel(st.hw, params * st.proj_wbytes, 2 * tok * params, st.rate), weight_units(st, params)


def attention_core(st, lay: Layout, tok):
    """KV read + score/value FLOPs over this GPU's KV shard."""
    m = st.model
    s_loc = st.context / lay.seq_split
    kv_bytes = tok * s_loc * kv_elems(m, lay) * st.kv_bytes
    flops = 2 * tok * s_loc * attended_heads(m, lay) * (m.qk_dim + m.v_dim)
    return kernel(st.hw, kv_bytes, flops, st.attn_rate)


def exchange_width(model, lay: Layout) -> int:
    """Elements per (token, head) the exchange moves besides the LSE."""
    return model.v_head_dim if (model.mla and lay.mla_x == "value") else model.v_dim


def exchange_plan(st, lay: Layout) -> tuple[str, float]:
    """(how the partials are combined, bytes per partial element): "a2a" (one all_to_all of
    partials + fp32 LSE), "rs" (all-gather the LSE, reduce-scatter the rescaled partials) or
    "ar" (all-gather the LSE, all-reduce the partials of every gathered head)."""
    m = st.model
    if lay.kind == "helix":
        return ("a2a" if lay.xback == "a2a" else "rs"), st.exchange_bytes
    if lay.kind == "kvp":
        return "ar", 4.0
    if lay.engine == "vllm":
        return ("a2a" if lay.xback == "a2a" else "rs"), ACT_BYTES
    if not m.mla:
        return "ar", 4.0  # SGLang's GQA DCP decode (triton): cp_lse_ag_out_rs_mha
    return ("rs", 4.0) if lay.xback == "ag_rs" else ("a2a", ACT_BYTES)


def exchange(st, lay: Layout, tok):
    """(latency part, bandwidth part) of the q all-gather and the partial exchange, seconds."""
    m, hw, ls, n = st.model, st.hw, st.latency_scale, lay.seq_split
    zero = 0.0 * tok
    if n <= 1 or lay.kind not in ("kvp", "dcp", "helix"):
        return zero, zero
    row = tok * attended_heads(m, lay)  # (token, head) partials one rank computes
    parts = []
    if lay.kind == "dcp" and not lay.qrep:  # the gathered query heads
        parts.append(split(all_gather, hw, row * m.qk_dim * ACT_BYTES, n, ls))
    how, xbytes = exchange_plan(st, lay)
    width = exchange_width(m, lay)
    if how == "a2a":
        parts.append(split(all_to_all, hw, row * (width * xbytes + LSE_BYTES), n, ls))
    else:
        parts.append(split(all_gather, hw, row * LSE_BYTES * n, n, ls))
        combine = all_reduce if how == "ar" else reduce_scatter
        parts.append(split(combine, hw, row * width * xbytes, n, ls))
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def w_uv_before_exchange(st, lay: Layout, tok):
    """(seconds, params held) of W_UV over the rank's attended heads before the exchange (Helix
    MLA value exchange; W_UV then lives replicated on the KVP ranks). 0 otherwise."""
    m = st.model
    if not (m.mla and lay.kind == "helix" and lay.mla_x == "value"):
        return 0.0 * tok, 0.0
    params = attended_heads(m, lay) * m.w_uv_per_head
    return kernel(st.hw, params * st.proj_wbytes, 2 * tok * params, st.rate), weight_units(st, params)


def attention_phase(st, lay: Layout, tok) -> Phase:
    """Input projections + attention + exchange (HOP-B for Helix) of one layer on one GPU."""
    t_in, p_in = input_projections(st, lay, tok)
    core = attention_core(st, lay, tok)
    x_lat, x_bw = exchange(st, lay, tok)
    slices = np.minimum(lay.hopb, np.maximum(tok, 1))
    if st.exchange_per_request and lay.kind == "helix":  # the paper's Figure 3: one exchange per request
        slices = np.where(lay.hopb > 1, np.maximum(tok, 1), 1.0)
        x_lat = x_lat * np.where(lay.hopb > 1, 1.0, np.maximum(tok, 1))  # off: B exchanges in a row
    t_v, p_v = w_uv_before_exchange(st, lay, tok / slices)  # W_UV weights read once per slice
    attn = t_in + hopb_overlap(core + slices * t_v, x_lat, x_bw, slices)
    return Phase(attn, x_lat + x_bw, core, p_in + p_v)


def output_phase(st, lay: Layout, tok) -> Phase:
    """o_proj (MLA: W_UV + o_proj; value exchange: o_proj only) over the heads this GPU owns
    after the exchange, and its all-reduce over the o_proj group."""
    m = st.model
    heads = m.num_heads / lay.out_split
    o_proj = heads * (m.out_params_per_head - m.w_uv_per_head)
    w_uv = 0.0 if lay.mla_x == "value" else heads * m.w_uv_per_head  # 0 for GQA
    t = kernel(st.hw, o_proj * st.wbytes + w_uv * st.proj_wbytes, 2 * tok * (o_proj + w_uv), st.rate)
    t = t + all_reduce(st.hw, tok * m.hidden * ACT_BYTES, lay.out_split, st.latency_scale)
    return Phase(t, 0.0 * tok, 0.0 * tok, o_proj + weight_units(st, w_uv))


def linear_attention_phase(st, lay: Layout, tok) -> Phase:
    """One Gated DeltaNet layer: its weights split over the attention TP group (N for Helix),
    the recurrent state of each request read and written (fp32), then the TP all-reduce."""
    m = st.model
    ways = lay.out_split
    params = m.linear_params / ways
    state = tok * m.linear_state / ways * STATE_BYTES * 2
    t = kernel(st.hw, params * st.wbytes + state, 2 * tok * params, st.rate)
    t = t + all_reduce(st.hw, tok * m.hidden * ACT_BYTES, ways, st.latency_scale)
    return Phase(t, 0.0 * tok, 0.0 * tok, params)
