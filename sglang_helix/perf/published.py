"""Published measurements on real hardware, each with its source address and setup, next to what
this model predicts for the same setup. Nothing here is fitted to them: the model runs with its
datasheet specs and stated assumptions; a figure whose source was not found is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import memory
from .hardware import get_hardware
from .layouts import Layout, all_layouts, vllm_dcp
from .model import Setting, step
from .paper import interactivity, users
from .search import batch_grid, sweep
from .specs import get_model


@dataclass(frozen=True)
class Published:
    key: str
    what: str  # the quantity, in the source's words
    published: float | None  # None: the source was not found
    source: str
    setup: str
    assumptions: str  # what the prediction assumes where the source is silent


TRTLLM_BLOG = ("https://github.com/NVIDIA/TensorRT-LLM/blob/main/docs/source/blogs/tech_blog/"
               "blog22_Helix_Parallelism_Scaling_Multi_Million_Token_Decoding_with_KV_Cache_Sharding.md")
VLLM_BLOG = ("https://vllm.ai/blog/2026-08-07-decode-context-parallelism (figures read from a stored "
             "translation of it; the page itself was not in the searchable store)")

PUBLISHED = (
    Published("trtllm-interactivity", "interactivity improvement (max tok/s/user, Helix vs conventional)", 1.8,
              TRTLLM_BLOG, "TensorRT-LLM, GB300 NVL72, DeepSeek-R1 FP4, 1M sequence, disaggregated (Helix on "
              "the generation servers), no HOP-B (future work), half-precision latent partials",
              "fp4 weights, fp8 KV, baseline TP / PP / DP attention, 1-64 GPUs, Helix without HOP-B"),
    Published("trtllm-concurrency", "concurrency improvement (tok/s/GPU at the same tok/s/user)", 32.0,
              TRTLLM_BLOG, "as above", "as above"),
    Published("vllm-dcp-throughput", "DCP tok/s/GPU over TP (TP: KV 100% full at concurrency 64, 1,863 "
              "tok/s/GPU; DCP: concurrency 512 at 82% KV, 6,091 tok/s/GPU)", 6091 / 1863, VLLM_BLOG,
              "vLLM, 8 x B200, Kimi-K2.6 NVFP4, TP8 vs TP8 + DCP, Mooncake agent trace (median input ~67K, "
              "output ~400, bimodal up to ~1M), concurrency 16..512",
              "kimi-k2 text model, fp4 weights, fp8 KV, 67K-token context for every request, DCP 8 "
              "(ag_rs), each layout at its largest feasible batch (DCP capped at 512)"),
    Published("sglang-dcp-throughput", "output throughput of TP16 + DCP4 over TP16 at concurrency 1024", None,
              "not found in the stored sources (the figure quoted to us: about 1.4x)",
              "SGLang, 16 x GB300, Qwen3.5-397B-A17B, TP16 vs TP16 / DCP4, concurrency 1024",
              "fp4 weights, fp8 KV, context 32K (the source's lengths unknown), batch 1024 or the largest "
              "that fits"),
)


@dataclass(frozen=True)
class Prediction:
    published: Published
    predicted: float
    detail: str


def _trtllm(lat: float) -> dict:
    st = Setting(get_model("deepseek-r1"), get_hardware("gb300"), 1 << 20, "fp4", "fp8", "activation", lat)
    lays = [lay for lay in all_layouts(st.model, 64, ("tp", "pp", "dpa", "helix"))
            if lay.kind != "helix" or (lay.hopb == 1 and lay.mla_x == "latent")]
    sw = sweep(st, lays, batch_grid(8192, per_octave=8))
    base = ("tp", "pp", "dpa")
    return {"trtllm-interactivity": (interactivity(sw, base), "max tok/s/user, Helix vs TP/PP/DP attention"),
            "trtllm-concurrency": (users(sw, base), "tok/s/GPU at equal tok/s/user, the most")}


def _at_capacity(st: Setting, lay: Layout, cap: int | None = None) -> tuple[int, float]:
    """(batch, tok/s/GPU) at the layout's largest feasible batch (at most `cap`)."""
    weights = step(st, lay, np.array([1.0])).weights_bytes
    b = memory.max_concurrency(st, lay, weights)
    b = min(b, cap) if cap else b
    res = step(st, lay, np.array([float(b)]))
    return b, float(res.tok_s_gpu(lay.gpus)[0])


def _vllm(lat: float) -> dict:
    st = Setting(get_model("kimi-k2"), get_hardware("b200"), 67 * 1024, "fp4", "fp8", latency_scale=lat)
    tp = Layout("tp", tpa=8, tpf=8)
    dcp = vllm_dcp(Layout("dcp", kvp=8, tpa=8, tpf=8))
    (bt, gt), (bd, gd) = _at_capacity(st, tp), _at_capacity(st, dcp, cap=512)
    return {"vllm-dcp-throughput": (gd / gt, f"TP8 batch {bt}: {gt:,.0f} tok/s/GPU; DCP8 batch {bd}: "
                                              f"{gd:,.0f} tok/s/GPU (roofline)")}


def _sglang(lat: float) -> dict:
    st = Setting(get_model("qwen3.5-397b"), get_hardware("gb300"), 32 * 1024, "fp4", "fp8", latency_scale=lat)
    tp, dcp = Layout("tp", tpa=16, tpf=16), Layout("dcp", kvp=4, tpa=16, tpf=16)
    (bt, gt), (bd, gd) = _at_capacity(st, tp, cap=1024), _at_capacity(st, dcp, cap=1024)
    return {"sglang-dcp-throughput": (gd / gt, f"TP16 batch {bt}: {gt:,.0f} tok/s/GPU; TP16/DCP4 batch {bd}: "
                                                f"{gd:,.0f} tok/s/GPU (roofline)")}


def predictions(latency_scale: float = 1.0) -> list[Prediction]:
    """The model's figure for every published one (latency_scale: multiplies the collective step
    latency, to show the model's largest assumption; 1 = the model as the planner runs it)."""
    found = {**_trtllm(latency_scale), **_vllm(latency_scale), **_sglang(latency_scale)}
    return [Prediction(p, *found[p.key]) for p in PUBLISHED]
