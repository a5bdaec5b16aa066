"""Analytic roofline of one decode step (one token for each of B requests), per GPU.

Every phase costs max(bytes / HBM bandwidth, FLOPs / FLOP rate) on the busiest GPU; every
collective costs latency steps + bytes / link bandwidth with the usual ring factors:

    all-to-all      1 step  + (n-1)/n   * buffer / bw     (buffer = what one rank holds)
    all-reduce      2 steps + 2(n-1)/n  * buffer / bw
    all-gather / reduce-scatter  1 step + (n-1)/n * full buffer / bw
(inside the NVLink domain a "step" is one switch traversal; beyond it, ceil(log2 n) steps).

A decode layer is: input projections -> attention over the KV cache -> (exchange) ->
o_proj -> all-reduce -> FFN or MoE -> all-reduce (or EP dispatch/combine).
Step time = sum over layers + LM head (+ PP hand-offs). Batch sizes are numpy arrays, so one
call evaluates a layout at many batch sizes. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import DEFAULT_MLA_EXCHANGE, MLA_EXCHANGES
from .layouts import Layout
from .specs import ACT_BYTES, LSE_BYTES, PRECISION_BYTES, HardwareSpec, ModelSpec, log2_steps


@dataclass(frozen=True)
class Setting:
    """What a step is evaluated at: model, hardware, context length S, precision."""

    model: ModelSpec
    hw: HardwareSpec
    context: int
    precision: str = "fp4"
    latency_scale: float = 1.0  # multiplies every collective latency (0 = bandwidth only)
    # MLA Helix layouts: "latent" exchanges kv_lora_rank per head (W_UV after the merge, H/N
    # heads); "value" replicates W_UV, applies it to all H heads before the exchange and
    # exchanges v_head_dim per head (docs/math.md section 4). No effect on GQA or baselines.
    mla_exchange: str = DEFAULT_MLA_EXCHANGE

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"context must be >= 1, got {self.context}")
        if self.mla_exchange not in MLA_EXCHANGES:
            raise ValueError(f"mla_exchange {self.mla_exchange!r} unknown; one of {MLA_EXCHANGES}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision {self.precision!r} unknown")
        self.hw.flop_rate(self.precision)  # SpecError if the chip cannot compute it

    @property
    def wbytes(self) -> float:
        """Bytes per weight / KV element."""
        return PRECISION_BYTES[self.precision]

    @property
    def rate(self) -> float:
        return self.hw.flop_rate(self.precision)

    @property
    def attn_rate(self) -> float:
        return self.hw.flop_rate(self.hw.attn_precision or self.precision)


# ---------------------------------------------------------------- collectives


def _link(st: Setting, n: int) -> tuple[float, float, int]:
    bw, lat = st.hw.link(n)
    steps = 1 if n <= st.hw.domain_size else log2_steps(n)
    return bw, lat * st.latency_scale, steps


def all_to_all(st: Setting, buffer, n: int):
    """One all_to_all of `buffer` bytes held per rank over n ranks."""
    if n <= 1:
        return 0.0 * buffer
    bw, lat, steps = _link(st, n)
    return steps * lat + (n - 1) / n * buffer / bw


def all_reduce(st: Setting, buffer, n: int):
    if n <= 1:
        return 0.0 * buffer
    bw, lat, steps = _link(st, n)
    return 2 * steps * lat + 2 * (n - 1) / n * buffer / bw


def all_gather(st: Setting, full, n: int):
    """All-gather (or reduce-scatter) whose full, gathered buffer is `full` bytes."""
    if n <= 1:
        return 0.0 * full
    bw, lat, steps = _link(st, n)
    return steps * lat + (n - 1) / n * full / bw


reduce_scatter = all_gather


# ---------------------------------------------------------------- phases


def roofline(st: Setting, nbytes, flops, rate: float | None = None):
    """max(memory time, compute time) of one kernel on one GPU."""
    return np.maximum(nbytes / st.hw.hbm_bw, flops / (rate or st.rate))


def kv_elems_per_gpu(model: ModelSpec, lay: Layout) -> float:
    """Cached elements per token per layer on one GPU (KV heads duplicated once tpa > K)."""
    return model.kv_shape.elems_per_token(lay.tpa)


def attn_tokens(lay: Layout, batch):
    """Requests whose attention one GPU computes in one micro-batch."""
    return np.ceil(np.ceil(batch / lay.pp) / lay.dpa)


def attention_core(st: Setting, lay: Layout, tokens):
    """KV read + score/value FLOPs over this GPU's KV shard, for `tokens` requests."""
    m = st.model
    s_loc = st.context / lay.kvp
    kv_bytes = tokens * s_loc * kv_elems_per_gpu(m, lay) * st.wbytes
    flops = 2 * tokens * s_loc * (m.num_heads / lay.tpa) * (m.qk_dim + m.v_dim)
    return roofline(st, kv_bytes, flops, st.attn_rate)


def value_exchange(model: ModelSpec, lay: Layout, mla_exchange: str) -> bool:
    """True when W_UV runs before the exchange: an MLA Helix layout with mla_exchange "value"."""
    return model.mla and lay.kind == "helix" and mla_exchange == "value"


def exchange_width(model: ModelSpec, lay: Layout, mla_exchange: str = DEFAULT_MLA_EXCHANGE) -> int:
    """Elements per (token, head) the exchange moves besides the LSE: MLA latent R, or Dv in the
    value exchange; GQA head_dim."""
    return model.v_head_dim if value_exchange(model, lay, mla_exchange) else model.v_dim


def exchange(st: Setting, lay: Layout, tokens, backend: str = "a2a"):
    """(latency part, bandwidth part) of combining the KVP partials, seconds."""
    m = st.model
    if lay.kvp <= 1 or lay.kind not in ("helix", "kvp"):
        return 0.0 * tokens, 0.0 * tokens
    heads = m.num_heads / lay.tpa
    width = exchange_width(m, lay, st.mla_exchange)
    if lay.kind == "helix" and backend == "a2a":  # output + fp32 LSE packed, one all_to_all
        return _split(all_to_all, st, tokens * heads * (width * ACT_BYTES + LSE_BYTES), lay.kvp)
    # ag_rs (Helix baseline backend) / Medha: all-gather the fp32 LSE, then reduce-scatter
    # (Helix) or all-reduce (Medha, whose o_proj is TP-tied) the rescaled fp32 partials.
    lse = _split(all_gather, st, tokens * heads * LSE_BYTES * lay.kvp, lay.kvp)
    reduce = reduce_scatter if lay.kind == "helix" else all_reduce
    parts = _split(reduce, st, tokens * heads * width * 4.0, lay.kvp)
    return lse[0] + parts[0], lse[1] + parts[1]


def _split(collective, st: Setting, buffer, n: int):
    """(latency part, bandwidth part) of one collective."""
    lat = collective(st, 0.0 * buffer, n)
    return lat, collective(st, buffer, n) - lat


def helix_exchange_bytes(model: ModelSpec, lay: Layout, tokens: int,
                         mla_exchange: str = DEFAULT_MLA_EXCHANGE) -> float:
    """Bytes one rank sends per layer in the Helix a2a (docs/math.md section 4); no S in it."""
    heads = model.num_heads / lay.tpa
    width = exchange_width(model, lay, mla_exchange)
    return tokens * heads * (width * ACT_BYTES + LSE_BYTES) * (lay.kvp - 1) / lay.kvp


def w_uv_params(model: ModelSpec) -> int:
    """W_UV elements of all heads in one MLA layer: H x R x Dv (0 for GQA)."""
    return model.num_heads * model.kv_lora_rank * model.v_head_dim if model.mla else 0


def value_projection(st: Setting, lay: Layout, tokens):
    """(seconds, params held) of W_UV over all H heads before the exchange, for `tokens`
    requests (value exchange only; W_UV then lives replicated on every GPU). 0 otherwise."""
    if not value_exchange(st.model, lay, st.mla_exchange):
        return 0.0 * tokens, 0
    params = w_uv_params(st.model)
    return roofline(st, params * st.wbytes, 2 * tokens * params), params


def hopb_overlap(attn, x_lat, x_bw, slices):
    """Attention + exchange with the batch cut in `slices` pipelined slices (1 = sum).

    Slice i's exchange overlaps slice i+1's attention: a + (s-1) * max(a, x) + x with
    a = attn / s, x = latency + bandwidth part / s (every slice pays the latency).
    """
    s = np.maximum(1.0, slices)
    a, x = attn / s, x_lat + x_bw / s
    return a + (s - 1) * np.maximum(a, x) + x


def input_projections(st: Setting, lay: Layout, tokens):
    """Q (and GQA K/V; MLA q_a, kv_a, q_b, absorbed W_UK) projections on one GPU."""
    m = st.model
    kv_share = (-(-m.num_kv_heads // lay.tpa)) / m.num_kv_heads
    params = m.attn_shared_params + m.attn_q_params / lay.tpa + m.attn_kv_params * kv_share
    return roofline(st, params * st.wbytes, 2 * tokens * params), params


def output_projection(st: Setting, lay: Layout, tokens):
    """o_proj (MLA: W_UV + o_proj; value exchange: o_proj only) over this GPU's heads, then its
    all-reduce."""
    m = st.model
    held_before = w_uv_params(m) if value_exchange(m, lay, st.mla_exchange) else 0
    params = (m.attn_out_params - held_before) / lay.out_split
    t = roofline(st, params * st.wbytes, 2 * tokens * params)
    return t + all_reduce(st, tokens * m.hidden * ACT_BYTES, lay.out_split), params


def experts_touched(model: ModelSpec, tokens, ep: int):
    """Expected experts one EP rank reads for `tokens` routed tokens (uniform routing).

    Distinct experts hit by tokens * top_k draws: E * (1 - (1 - k/E)^T); spread over ep ranks,
    and the busiest rank reads at least one.
    """
    e, k = model.num_experts, model.top_k
    touched = e * (1.0 - (1.0 - k / e) ** tokens)
    return np.minimum(np.maximum(touched / ep, 1.0), e / ep)


def ffn(st: Setting, lay: Layout, tokens, moe: bool):
    """FFN / MoE on one GPU for `tokens` tokens of its group, plus the FFN collectives."""
    m = st.model
    g = lay.ffn_group
    if not moe:
        params = m.dense_ffn_params / g
        t = roofline(st, params * st.wbytes, 2 * tokens * params)
        return t + _ffn_comm(st, lay, tokens, moe=False), params
    shared = m.num_shared_experts * m.expert_params / g + m.router_params
    read = experts_touched(m, tokens, lay.ep) * m.expert_params / lay.tpf + shared
    flops = 2 * tokens * (m.top_k * m.expert_params / g + shared)
    held = (m.num_experts / lay.ep) * m.expert_params / lay.tpf + shared
    return roofline(st, read * st.wbytes, flops) + _ffn_comm(st, lay, tokens, moe=True), held


def _ffn_comm(st: Setting, lay: Layout, tokens, moe: bool):
    m = st.model
    row = m.hidden * ACT_BYTES
    if lay.kind != "ep":
        return all_reduce(st, tokens * row, lay.ffn_group)
    local = np.ceil(tokens / lay.dpa)  # tokens one DP-attention rank owns
    if moe:  # dispatch + combine: each rank sends its tokens' top_k copies to their experts
        return 2 * all_to_all(st, local * m.top_k * row, lay.ffn_group)
    return all_gather(st, tokens * row, lay.attn_group) + reduce_scatter(st, tokens * row, lay.attn_group)


@dataclass(frozen=True)
class StepResult:
    """Arrays over the batch sizes: step time (TTL) and its parts (seconds), memory (bytes)."""

    batch: np.ndarray
    ttl: np.ndarray
    attention: np.ndarray  # input projections + KV attention + exposed exchange, all layers
    exchange: np.ndarray  # exchange time alone (before HOP-B overlap), all layers
    kv_read: np.ndarray  # attention core alone, all layers
    ffn: np.ndarray  # o_proj + FFN/MoE + their collectives, all layers
    weights_bytes: float
    kv_bytes: np.ndarray
    feasible: np.ndarray

    @property
    def tok_s_user(self):
        return 1.0 / self.ttl

    def tok_s_gpu(self, gpus: int):
        return self.batch / self.ttl / gpus


def _layer(st: Setting, lay: Layout, batch, moe: bool, backend: str):
    """(attention part, exchange, kv core, ffn part, weight params) of one layer, seconds/GPU."""
    mb = np.ceil(batch / lay.pp)  # micro-batch tokens
    tok = attn_tokens(lay, batch)
    t_in, p_in = input_projections(st, lay, tok)
    core = attention_core(st, lay, tok)
    x_lat, x_bw = exchange(st, lay, tok, backend)
    slices = np.minimum(lay.hopb, tok)
    t_v, p_v = value_projection(st, lay, tok / slices)  # per HOP-B slice: W_UV read each time
    attn = t_in + hopb_overlap(core + slices * t_v, x_lat, x_bw, slices)
    out_tokens = mb if lay.kind == "helix" else tok
    t_out, p_out = output_projection(st, lay, out_tokens)
    t_ffn, p_ffn = ffn(st, lay, mb, moe)
    return attn, x_lat + x_bw, core, t_out + t_ffn, p_in + p_v + p_out + p_ffn


def step(st: Setting, lay: Layout, batch, backend: str = "a2a") -> StepResult:
    """Evaluate `lay` at every batch size in `batch` (array-like of ints >= 1)."""
    m = st.model
    batch = np.asarray(batch, dtype=float)
    parts = {}
    if m.num_dense_layers:
        parts["dense"] = (m.num_dense_layers, _layer(st, lay, batch, False, backend))
    if m.num_moe_layers:
        parts["moe"] = (m.num_moe_layers, _layer(st, lay, batch, True, backend))
    attn = sum(n * p[0] for n, p in parts.values())
    xch = sum(n * p[1] for n, p in parts.values())
    core = sum(n * p[2] for n, p in parts.values())
    ffn_t = sum(n * p[3] for n, p in parts.values())
    layer_params = sum(n * p[4] for n, p in parts.values())
    head, head_params = _lm_head(st, lay, np.ceil(batch / lay.pp))
    ttl = attn + ffn_t + head + _pp_handoff(st, lay, batch)
    per_stage = -(-m.num_layers // lay.pp) / m.num_layers
    weights = (layer_params * per_stage + head_params) * st.wbytes
    kv = (np.ceil(batch / lay.dpa) * (st.context / lay.kvp) * kv_elems_per_gpu(m, lay)
          * st.wbytes * -(-m.num_layers // lay.pp))
    feasible = (weights + kv) <= st.hw.usable_memory
    return StepResult(batch, ttl, attn, xch, core, ffn_t, float(weights), kv, feasible)


def _lm_head(st: Setting, lay: Layout, tokens):
    """Vocab-parallel LM head over the stage's GPUs; embedding stored alongside (same split)."""
    params = st.model.vocab * st.model.hidden / lay.attn_group
    return roofline(st, params * st.wbytes, 2 * tokens * params), 2 * params


def _pp_handoff(st: Setting, lay: Layout, batch):
    if lay.pp <= 1:
        return 0.0 * batch
    bw, lat = st.hw.link(lay.gpus)
    row = np.ceil(batch / lay.pp) * st.model.hidden * ACT_BYTES
    return (lay.pp - 1) * (lat * st.latency_scale + row / bw)


def attention_layer_time(st: Setting, lay: Layout, batch: int, backend: str = "a2a",
                         w_uv: bool = False) -> dict:
    """One layer's decode attention as benchmarks/bench_layer.py times it: attention over the
    local shard, exchange, merge (no projections, no FFN). Seconds. w_uv (MLA): also W_UV, as
    bench_layer's --mla-exchange rows time it: over all H heads before the exchange (value
    exchange) or over the H/out_split output heads after the merge (latent)."""
    m = st.model
    tok = np.asarray(float(batch))
    core = float(attention_core(st, lay, tok))
    x_lat, x_bw = exchange(st, lay, tok, backend)
    width = exchange_width(m, lay, st.mla_exchange)
    merge_bytes = batch * (m.num_heads / lay.out_split) * lay.kvp * (width * ACT_BYTES + LSE_BYTES) * 2
    merge = merge_bytes / st.hw.hbm_bw if lay.kvp > 1 else 0.0
    x = float(x_lat + x_bw)
    proj = 0.0
    if w_uv and m.mla:
        heads = m.num_heads if value_exchange(m, lay, st.mla_exchange) else m.num_heads / lay.out_split
        params = heads * m.kv_lora_rank * m.v_head_dim
        proj = float(roofline(st, params * st.wbytes, 2 * batch * params))
    return {"attn": core, "exchange": x, "merge": merge, "w_uv": proj,
            "step": core + x + merge + proj}
