"""The planner's answer: every family's layouts (Helix, SGLang --dcp-size, plain TP, DP attention,
PP) at one objective, ranked, each with its launch line and the plugin's verdict on it.

Objective: `batch` B (lowest TPOT at B), or `tpot` T seconds (most tok/s/GPU at TPOT <= T), or
neither (lowest TPOT at batch 1). A Helix line the rules refuse at the requested weights / KV dtype
is re-evaluated at the nearest wider dtypes the rules accept (fp4 -> fp8 -> bf16; of the
planner's dtypes the rules refuse only an fp4 KV cache: NVFP4 weights pass for MLA and GQA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import memory
from .launch import PRECISIONS, Launch, launch, plugin_refusal
from .layouts import Layout, layouts_for
from .model import Setting, step
from .search import FI_A2A_CHIPS, PlannerError

PLANNER_KINDS = ("helix", "dcp", "tp", "dpa", "pp")
FAMILY_NAMES = {"helix": "Helix", "dcp": "--dcp-size", "tp": "plain TP", "dpa": "DP attention", "pp": "PP",
                "kvp": "Medha KVP"}


@dataclass(frozen=True)
class Row:
    """One layout at the objective: its best batch, TPOT, throughput, memory, launch line."""

    setting: Setting
    layout: Layout
    batch: int
    ttl: float
    max_concurrency: int
    memory_bytes: float
    launch: Launch
    note: str = ""

    @property
    def family(self) -> str:
        return self.layout.kind

    @property
    def tok_s_user(self) -> float:
        return 1.0 / self.ttl

    @property
    def tok_s_gpu(self) -> float:
        return self.batch / self.ttl / self.layout.gpus


@dataclass(frozen=True)
class Ranking:
    rows: list[Row]  # best first; only rows whose launch line the rules accept (or with no line)
    refused: dict  # family -> the plugin's refusal at the requested dtypes
    objective: str
    evaluated: int
    kinds: tuple[str, ...] = PLANNER_KINDS
    dcp_at_helix_dtypes: Row | None = None  # the best --dcp-size row at the Helix row's dtypes
    absent: tuple[str, ...] = ()  # families with no valid layout on these GPUs (e.g. GQA DCP at TP <= K)

    def best(self, kind: str) -> Row | None:
        return next((r for r in self.rows if r.family == kind), None)

    @property
    def winner(self) -> Row | None:
        return next((r for r in self.rows if r.launch.argv), None)


def _wider(values: tuple[str, ...], start: str, chip_flops) -> list[str]:
    later = values[values.index(start):] if start in values else (start,)
    return [v for v in later if v in chip_flops]


def dtype_candidates(st: Setting) -> list[Setting]:
    """st, then wider KV dtypes, then wider weights (each with the KV dtype at least as wide)."""
    out = []
    for w in _wider(PRECISIONS, st.weights, st.hw.flops):
        for kv in _wider(PRECISIONS, st.kv, set(PRECISIONS)):
            out.append(replace(st, weights=w, kv_dtype=kv))
    return out


def accepted_setting(st: Setting, lay: Layout) -> tuple[Setting | None, str | None]:
    """(the first dtype setting whose launch line for `lay` the rules accept, the refusal at
    st's dtypes or None)."""
    first = None
    for cand in dtype_candidates(st):
        reason = plugin_refusal(cand.model, launch(cand, lay, 1).argv)
        if reason is None:
            return cand, first
        first = first or reason
    return None, first


def _objective(batch: int | None, tpot: float | None) -> str:
    if batch is not None:
        return f"lowest TPOT at batch {batch}"
    if tpot is not None:
        return f"most tok/s/GPU at TPOT <= {tpot * 1e3:g} ms"
    return "lowest TPOT at batch 1"


def best_point(st: Setting, lay: Layout, batches: np.ndarray, batch: int | None, tpot: float | None):
    """(batch, ttl, memory bytes, weights bytes) of `lay` at the objective, or None."""
    grid = np.array([batch or 1], dtype=float) if tpot is None else batches
    res = step(st, lay, grid)
    ok = res.feasible & (res.ttl <= tpot * (1 + 1e-9) if tpot is not None else True)
    if not ok.any():
        return None
    i = int(np.flatnonzero(ok)[np.argmax((grid / res.ttl)[ok])]) if tpot is not None else 0
    return int(grid[i]), float(res.ttl[i]), float(res.memory_bytes[i]), res.weights_bytes


def rank(st: Setting, gpus: int, batches, batch: int | None = None, tpot: float | None = None,
         kinds: tuple[str, ...] = PLANNER_KINDS) -> Ranking:
    """Every layout of `kinds` on `gpus` GPUs at the objective, best first."""
    lays = [lay for lay in layouts_for(st.model, gpus, kinds, fi_a2a=st.hw.name in FI_A2A_CHIPS)
            if lay.kind != "helix" or lay.kvp > 1]  # Helix KVP 1 is plain TP
    if not lays:
        raise PlannerError(f"--gpus {gpus}: no layout of {st.model.name} uses exactly {gpus} GPUs "
                           f"(TP sizes must divide {st.model.num_heads} heads)")
    batches = np.asarray(sorted(set(batches)), dtype=float)
    rows, refused, settings = _rows(st, lays, batches, batch, tpot)
    key = (lambda r: (-r.tok_s_gpu, r.ttl)) if tpot is not None else (lambda r: (r.ttl, -r.tok_s_gpu))
    rows.sort(key=key)
    helix = next((r for r in rows if r.family == "helix"), None)
    rival = None
    if helix is not None and helix.setting != st and "dcp" in kinds:
        dcp = [lay for lay in lays if lay.kind == "dcp"]
        rival = min(_rows(helix.setting, dcp, batches, batch, tpot)[0], key=key, default=None)
    absent = tuple(k for k in kinds if not any(lay.kind == k for lay in lays))
    return Ranking(rows, refused, _objective(batch, tpot), len(lays) * (len(batches) if tpot else 1), kinds, rival,
                   absent)


def _rows(st: Setting, lays: list[Layout], batches, batch, tpot):
    """(rows, refusals per family, accepted dtype settings) of `lays` at the objective."""
    rows, refused, settings = [], {}, {}
    for lay in lays:
        key = (lay.kind, lay.mla_x, lay.xback)
        if key not in settings:
            settings[key] = accepted_setting(st, lay)
        cand, reason = settings[key]
        if reason is not None:
            refused.setdefault(lay.kind, reason)
        if cand is None:
            continue
        point = best_point(cand, lay, batches, batch, tpot)
        if point is None:
            continue
        b, ttl, mem, weights = point
        ln = launch(cand, lay, b)
        if ln.argv and plugin_refusal(cand.model, ln.argv) is not None:
            continue  # never offer a line the plugin would refuse
        note = "" if cand == st else f"{cand.weights} weights, {cand.kv} KV (refused at {st.weights}/{st.kv})"
        rows.append(Row(cand, lay, b, ttl, memory.max_concurrency(cand, lay, weights), mem, ln, note))
    return rows, refused, settings


def _same_point(a: Row, b: Row) -> bool:
    return a.family == b.family and abs(a.ttl / b.ttl - 1) < 1e-3 and abs(a.tok_s_gpu / b.tok_s_gpu - 1) < 1e-3


def top_rows(ranking: Ranking, extra: int = 4) -> list[Row]:
    """The best row of each family plus the next `extra` best rows that differ from every row
    already chosen (layouts tied at the objective show once), in rank order."""
    chosen = []
    for r in ranking.rows:
        if all(c.family != r.family for c in chosen):
            chosen.append(r)
    for r in ranking.rows:
        if extra <= 0:
            break
        if not any(r is c or _same_point(r, c) for c in chosen):
            chosen.append(r)
            extra -= 1
    order = {id(r): i for i, r in enumerate(ranking.rows)}
    return sorted(chosen, key=lambda r: order[id(r)])
