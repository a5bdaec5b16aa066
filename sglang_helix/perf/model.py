"""Analytic roofline of one decode step (one token for each of B requests), per GPU.

A decode layer is: attention side (attention.py: input projections -> attention over the KV
shard -> q all-gather / exchange -> o_proj -> all-reduce), or a linear-attention layer, then the
FFN or MoE (TP all-reduce, or EP dispatch/combine). Step time = sum over layers + LM head (+ PP
hand-offs). Every phase costs max(bytes / HBM bandwidth, FLOPs / FLOP rate) on the busiest GPU;
collectives are in collectives.py. Batch sizes are numpy arrays, so one call evaluates a layout
at many batch sizes. Memory (weights, KV from kv_size, states, SGLang's reserve) is memory.py.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import EXCHANGE_DTYPES
from . import memory
from .attention import attention_phase, kv_elems, linear_attention_phase, output_phase
from .collectives import all_gather, all_reduce, all_to_all, kernel, reduce_scatter
from .hardware import HardwareSpec
from .layouts import Layout
from .specs import ACT_BYTES, PRECISION_BYTES, ModelSpec


@dataclass(frozen=True)
class Setting:
    """What a step is evaluated at: model, hardware, context S, weights and KV dtypes, the Helix
    exchange dtype (fp32: the plugin's default; activation: bf16), collective latency scale."""

    model: ModelSpec
    hw: HardwareSpec
    context: int
    weights: str = "fp4"
    kv_dtype: str | None = None  # None: the weights' dtype
    exchange_dtype: str = "fp32"  # also "fp8": a model-only what-if (the plugin has no fp8 exchange)
    latency_scale: float = 1.0  # multiplies every collective latency (0 = bandwidth only)
    # The Helix paper's HOP-B picture (its Figure 3): every request's exchange is its own
    # collective paying the latency; HOP-B pipelines them request by request (used only to show
    # that modelling difference; the planner batches the exchange per HOP-B slice).
    exchange_per_request: bool = False
    # At fp4 weights, the dtype of the MLA projections (q_a/q_b/kv_a/kv_b: the q projection,
    # W_UK, W_UV). NVIDIA's NVFP4 DeepSeek / Kimi exports keep them bf16 (the planner CLI's
    # default); "fp4" is the paper's all-fp4 setting.
    fp4_mla_projections: str = "fp4"

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"context must be >= 1, got {self.context}")
        for name, value in (("weights", self.weights), ("kv_dtype", self.kv_dtype or self.weights)):
            if value not in PRECISION_BYTES:
                raise ValueError(f"{name} {value!r} unknown; one of {', '.join(PRECISION_BYTES)}")
        if self.fp4_mla_projections not in PRECISION_BYTES:
            raise ValueError(f"fp4_mla_projections {self.fp4_mla_projections!r} unknown; one of "
                             f"{', '.join(PRECISION_BYTES)}")
        if self.exchange_dtype not in EXCHANGE_DTYPES + ("fp8",):
            raise ValueError(f"exchange_dtype {self.exchange_dtype!r}; one of {', '.join(EXCHANGE_DTYPES)}")
        self.hw.flop_rate(self.weights)  # SpecError if the chip cannot compute it

    @property
    def kv(self) -> str:
        return self.kv_dtype or self.weights

    @property
    def wbytes(self) -> float:
        return PRECISION_BYTES[self.weights]

    @property
    def proj_wbytes(self) -> float:
        """Bytes of one attention input-projection / W_UV weight (MLA at fp4 weights: the
        projections' own dtype, `fp4_mla_projections`; otherwise the weights')."""
        mla_fp4 = self.model.mla and self.weights == "fp4"
        return PRECISION_BYTES[self.fp4_mla_projections if mla_fp4 else self.weights]

    @property
    def kv_bytes(self) -> float:
        return PRECISION_BYTES[self.kv]

    @property
    def exchange_bytes(self) -> float:
        """Bytes of one exchanged Helix partial element."""
        return {"fp32": 4.0, "fp8": 1.0}.get(self.exchange_dtype, ACT_BYTES)

    @property
    def rate(self) -> float:
        return self.hw.flop_rate(self.weights)

    @property
    def attn_rate(self) -> float:
        """Attention math at the KV dtype's rate (bf16 when the chip lacks it)."""
        prec = self.hw.attn_precision or (self.kv if self.kv in self.hw.flops else "bf16")
        return self.hw.flop_rate(prec)


def kv_elems_per_gpu(model: ModelSpec, lay: Layout) -> int:
    """Cached elements per token per layer on one GPU (KV heads duplicated once the head split
    exceeds K)."""
    return kv_elems(model, lay)


def experts_touched(model: ModelSpec, tokens, ep: int):
    """Expected experts one EP rank reads for `tokens` routed tokens (uniform routing).

    Distinct experts hit by tokens * top_k draws: E * (1 - (1 - k/E)^T); spread over ep ranks,
    and the busiest rank reads at least one.
    """
    e, k = model.num_experts, model.top_k
    touched = e * (1.0 - (1.0 - k / e) ** tokens)
    return np.minimum(np.maximum(touched / ep, 1.0), e / ep)


def ffn(st: Setting, lay: Layout, tokens, moe: bool):
    """(seconds, params held) of the FFN / MoE on one GPU for `tokens` tokens of its group, plus
    the FFN collectives."""
    m = st.model
    g = lay.ffn_group
    if not moe:
        params = m.dense_ffn_params / g
        t = kernel(st.hw, params * st.wbytes, 2 * tokens * params, st.rate)
        return t + _ffn_comm(st, lay, tokens, moe=False), params
    shared = m.num_shared_experts * m.expert_params / g + m.router_params
    read = experts_touched(m, tokens, lay.ep) * m.expert_params / lay.tpf + shared
    flops = 2 * tokens * (m.top_k * m.expert_params / g + shared)
    held = (m.num_experts / lay.ep) * m.expert_params / lay.tpf + shared
    return kernel(st.hw, read * st.wbytes, flops, st.rate) + _ffn_comm(st, lay, tokens, moe=True), held


def _ffn_comm(st: Setting, lay: Layout, tokens, moe: bool):
    m, hw, ls = st.model, st.hw, st.latency_scale
    row = m.hidden * ACT_BYTES
    if lay.kind != "dpa":
        return all_reduce(hw, tokens * row, lay.ffn_group, ls)
    local = np.ceil(tokens / lay.dpa)  # tokens one DP-attention group owns
    if moe:  # dispatch + combine: each rank sends its tokens' top_k copies to their experts
        return 2 * all_to_all(hw, local * m.top_k * row, lay.ffn_group, ls)
    return all_gather(hw, tokens * row, lay.attn_group, ls) + reduce_scatter(hw, tokens * row, lay.attn_group, ls)


@dataclass(frozen=True)
class StepResult:
    """Arrays over the batch sizes: step time (TTL) and its parts (seconds), memory (bytes)."""

    batch: np.ndarray
    ttl: np.ndarray
    attention: np.ndarray  # attention side (projections, attention, exposed exchange), all layers
    exchange: np.ndarray  # q all-gather + exchange alone (before HOP-B overlap), all layers
    kv_read: np.ndarray  # attention over the KV shards alone, all layers
    ffn: np.ndarray  # o_proj + FFN/MoE + their collectives, all layers
    weights_bytes: float
    kv_bytes: np.ndarray  # KV + recurrent states resident on the busiest GPU
    memory_bytes: np.ndarray  # weights + KV/states + SGLang's reserve
    feasible: np.ndarray

    @property
    def tok_s_user(self):
        return 1.0 / self.ttl

    def tok_s_gpu(self, gpus: int):
        return self.batch / self.ttl / gpus


def attn_tokens(lay: Layout, batch):
    """Requests whose attention one GPU computes in one micro-batch."""
    return np.ceil(np.ceil(batch / lay.pp) / lay.dpa)


def _layers(st: Setting, lay: Layout, batch):
    """{name: (count, attention side, exchange, core, o_proj + ffn, params)} per layer type."""
    m = st.model
    mb = np.ceil(batch / lay.pp)  # micro-batch tokens
    tok = attn_tokens(lay, batch)
    out_tok = tok if lay.kind in ("dpa", "kvp") else mb
    attn, out = attention_phase(st, lay, tok), output_phase(st, lay, out_tok)
    lin = linear_attention_phase(st, lay, tok) if m.linear_layers else None
    out_layers: dict = {}
    moe_layers = [(False, m.num_dense_layers), (True, m.num_moe_layers)]
    # linear-attention layers are spread over dense and MoE layers in proportion (Qwen3.5: all MoE)
    for moe, count in moe_layers:
        if not count:
            continue
        t_ffn, p_ffn = ffn(st, lay, mb, moe)
        n_lin = count * m.linear_layers / m.num_layers
        n_att = count - n_lin
        out_layers[f"attn-{moe}"] = (n_att, attn.time, attn.exchange, attn.core, out.time + t_ffn,
                                     attn.params + out.params + p_ffn)
        if lin is not None:
            out_layers[f"lin-{moe}"] = (n_lin, lin.time, 0.0 * tok, 0.0 * tok, t_ffn, lin.params + p_ffn)
    return out_layers


def step(st: Setting, lay: Layout, batch) -> StepResult:
    """Evaluate `lay` at every batch size in `batch` (array-like of ints >= 1)."""
    m = st.model
    batch = np.asarray(batch, dtype=float)
    parts = _layers(st, lay, batch).values()
    attn, xch, core, ffn_t, layer_params = (sum(p[0] * p[i] for p in parts) for i in range(1, 6))
    head, head_params = _lm_head(st, lay, np.ceil(batch / lay.pp))
    ttl = attn + ffn_t + head + _pp_handoff(st, lay, batch)
    per_stage = -(-m.num_layers // lay.pp) / m.num_layers
    weights = (layer_params * per_stage + head_params) * st.wbytes
    mem = memory.footprint(st, lay, batch, float(weights))
    return StepResult(batch, ttl, attn, xch, core, ffn_t, float(weights), mem.kv, mem.total, mem.feasible)


def _lm_head(st: Setting, lay: Layout, tokens):
    """Vocab-parallel LM head over the stage's GPUs; embedding stored alongside (same split)."""
    params = st.model.vocab * st.model.hidden / lay.attn_group
    return kernel(st.hw, params * st.wbytes, 2 * tokens * params, st.rate), 2 * params


def _pp_handoff(st: Setting, lay: Layout, batch):
    if lay.pp <= 1:
        return 0.0 * batch
    bw, lat, _ = st.hw.link(lay.gpus)
    row = np.ceil(batch / lay.pp) * st.model.hidden * ACT_BYTES
    return (lay.pp - 1) * (lat * st.latency_scale + row / bw)


def attention_layer_time(st: Setting, lay: Layout, batch: int, w_uv: bool = False) -> dict:
    """One layer's decode attention as benchmarks/bench_layer.py times it: attention over the
    local shard, exchange, merge (no projections, no FFN). Seconds. w_uv (MLA): also W_UV, over
    all attended heads before the exchange (value) or the H/out_split heads after it (latent)."""
    from .attention import attended_heads, attention_core, exchange, exchange_width

    m = st.model
    tok = np.asarray(float(batch))
    core = float(attention_core(st, lay, tok))
    x_lat, x_bw = exchange(st, lay, tok)
    width = exchange_width(m, lay)
    merge_bytes = batch * (m.num_heads / lay.out_split) * lay.seq_split * (width * st.exchange_bytes + 4) * 2
    merge = merge_bytes / st.hw.hbm_bw if lay.seq_split > 1 else 0.0
    proj = 0.0
    if w_uv and m.mla:
        heads = attended_heads(m, lay) if lay.mla_x == "value" else m.num_heads / lay.out_split
        params = heads * m.w_uv_per_head
        proj = float(kernel(st.hw, params * st.proj_wbytes, 2 * batch * params, st.rate))
    x = float(x_lat + x_bw)
    return {"attn": core, "exchange": x, "merge": merge, "w_uv": proj, "step": core + x + merge + proj}
