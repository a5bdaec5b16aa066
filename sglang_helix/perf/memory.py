"""Memory per GPU of a layout: weights held, KV of the resident requests (kv_size: pages on the
busiest rank), linear-attention states, and the activation reserve SGLang keeps free.

KV per request per GPU, by family (P = page size, kv_size.request_bytes_per_rank):

- tp / pp / dpa: every page of the request, KV heads split over the attention TP (duplicated
  once TP > K; MLA's latent on every rank), page 1 (SGLang's default; MLA 64, what FlashMLA and
  TRT-LLM MLA force);
- kvp (Medha): 1/KVP of the pages;
- dcp: token-interleaved over DCP ranks inside widened P x DCP pages (SGLang's allocator and radix
  tree page at P x DCP): ceil(S / (P x DCP)) pages of P tokens each on every rank;
- helix: pages of 64 (the plugin's default) dealt round-robin over KVP: the busiest rank holds
  ceil(pages / KVP).

Reserve: SGLang 0.5.23's decode-server activation reserve (arg_groups/overrides.py,
pre_capture_activation_reserve_mb_of): 512 MiB + max(B, 2048) x 1.5 MiB + TP x PP / 8 GiB, at
least 10 GiB on GPUs over 60 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kv_size
from ..rules.kv_cache import HELIX_DEFAULT_PAGE_SIZE
from .attention import kv_ranks
from .layouts import Layout
from .specs import STATE_BYTES

_MIB, _GIB = 1 << 20, 1 << 30
MLA_PAGE_SIZE = 64  # FlashMLA needs 64; TRT-LLM MLA 32 or 64 (SGLang forces them)


def page_size(model, lay: Layout) -> int:
    """Tokens per KV page of one rank (before DCP widens it)."""
    if lay.kind == "helix":
        return HELIX_DEFAULT_PAGE_SIZE
    return MLA_PAGE_SIZE if model.mla else 1


def kv_bytes_per_request(st, lay: Layout) -> float:
    """KV bytes one `st.context`-token request occupies on its busiest GPU (whole pages), over
    the layers of one pipeline stage."""
    m = st.model
    row = m.kv_shape.bytes_per_token(1, kv_ranks(lay))  # elements x layers; x dtype bytes below
    page = page_size(m, lay)
    if lay.kind == "dcp":
        widened = kv_size.request_bytes_per_rank(st.context, page * lay.kvp, 1, row)
        elems = widened / lay.kvp  # each rank stores P of every P x DCP widened page
    else:
        split = lay.kvp if lay.kind in ("kvp", "helix") else 1
        elems = kv_size.request_bytes_per_rank(st.context, page, split, row)
    stage = -(-m.attention_layers // lay.pp) / m.attention_layers
    return elems * stage * st.kv_bytes


def state_bytes_per_request(st, lay: Layout) -> float:
    """Linear-attention recurrent state of one request on one GPU (fp32, split like the heads)."""
    m = st.model
    layers = -(-m.linear_layers // lay.pp)
    return layers * m.linear_state / lay.out_split * STATE_BYTES


def reserve_bytes(hw, gpus: int, batch):
    """SGLang's decode-server activation reserve (module docstring)."""
    mib = 512 + np.maximum(batch, 2048) * 1.5 + gpus / 8 * 1024
    if hw.hbm_capacity > 60 * _GIB:
        mib = np.maximum(mib, 10 * 1024)
    return mib * _MIB


def requests_per_gpu(lay: Layout, batch):
    """Requests whose KV one GPU holds (a DP-attention group holds only its own)."""
    return np.ceil(np.asarray(batch, dtype=float) / lay.dpa)


@dataclass(frozen=True)
class Footprint:
    kv: np.ndarray  # KV + states of the resident requests
    total: np.ndarray  # + weights + reserve
    feasible: np.ndarray


def footprint(st, lay: Layout, batch, weights: float) -> Footprint:
    """Bytes per GPU at each batch size, and whether they fit its HBM."""
    per_req = kv_bytes_per_request(st, lay) + state_bytes_per_request(st, lay)
    kv = requests_per_gpu(lay, batch) * per_req
    total = weights + kv + reserve_bytes(st.hw, lay.gpus, batch)
    return Footprint(kv, total, total <= st.hw.hbm_capacity)


def max_concurrency(st, lay: Layout, weights: float) -> int:
    """The most requests of `st.context` tokens the layout holds at once (0: not even one)."""
    per_req = kv_bytes_per_request(st, lay) + state_bytes_per_request(st, lay)
    free = st.hw.hbm_capacity - weights - reserve_bytes(st.hw, lay.gpus, 2048)
    if free < per_req:
        return 0
    lo, hi = 0, int(free // per_req) + 1  # in units of one request per GPU (feasibility is monotone)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = footprint(st, lay, np.array([mid * lay.dpa]), weights).feasible[0]
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo * lay.dpa
