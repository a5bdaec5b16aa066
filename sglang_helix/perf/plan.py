"""Planner logic: sweep layouts x batch sizes, Pareto frontiers, the chosen layout, launch line.

Throughput-interactivity points as in the Helix paper: tok/s/user = 1 / TTL and
tok/s/GPU = B / TTL / GPUs. No argparse here (the CLI is `python -m sglang_helix.plan`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .layouts import BASELINE_KINDS, KINDS, Layout, layouts_for
from .model import Setting, step


MAX_GPUS = 1024  # one instance; beyond this, run replicas


class PlanError(ValueError):
    """An input the planner cannot serve; the message is one line naming the fix."""


def batch_grid(max_batch: int = 8192, per_octave: int = 4) -> list[int]:
    """1..16, then geometric steps (`per_octave` per doubling), up to max_batch."""
    out = set(range(1, min(16, max_batch) + 1))
    b = 16.0
    while b <= max_batch:
        out.add(int(round(b)))
        b *= 2 ** (1 / per_octave)
    return sorted(out)


_SUFFIX = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def parse_context(text: str) -> int:
    """'64K' -> 65536, '1M' -> 1048576, '1048576' -> 1048576 (binary K/M/G suffixes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)\s*", str(text))
    if not match:
        raise PlanError(f"context {text!r}: use a token count like 65536, 64K or 1M")
    value = float(match.group(1)) * _SUFFIX[match.group(2).upper()]
    if value < 1 or value != int(value):
        raise PlanError(f"context {text!r}: must be a whole number of tokens >= 1")
    return int(value)


@dataclass
class Sweep:
    """Feasible (layout, batch) points as parallel arrays; `evaluated` counts all configs tried."""

    layouts: list[Layout]
    layout_idx: np.ndarray
    batch: np.ndarray
    ttl: np.ndarray
    gpus: np.ndarray
    hopb_off_ttl: np.ndarray  # TTL of the same point with HOP-B slices = 1
    evaluated: int
    mem_need: float  # smallest weights + KV per GPU at batch 1 over all layouts (bytes)

    @property
    def tok_s_user(self) -> np.ndarray:
        return 1.0 / self.ttl

    @property
    def tok_s_gpu(self) -> np.ndarray:
        return self.batch / self.ttl / self.gpus

    def select(self, mask: np.ndarray) -> Sweep:
        return Sweep(self.layouts, self.layout_idx[mask], self.batch[mask], self.ttl[mask], self.gpus[mask],
                     self.hopb_off_ttl[mask], self.evaluated, self.mem_need)

    def kinds(self, kinds: tuple[str, ...]) -> Sweep:
        wanted = np.array([lay.kind in kinds for lay in self.layouts], dtype=bool)
        return self.select(wanted[self.layout_idx] if len(self.layout_idx) else np.zeros(0, bool))

    def layout(self, i: int) -> Layout:
        return self.layouts[int(self.layout_idx[i])]


def sweep(st: Setting, layouts: list[Layout], batches) -> Sweep:
    """Evaluate every layout at every batch size; keep the points that fit in memory."""
    batches = np.asarray(batches, dtype=float)
    cols = {k: [] for k in ("idx", "b", "ttl", "g", "off")}
    mem_need = float("inf")
    off_cache: dict[Layout, np.ndarray] = {}
    for i, lay in enumerate(layouts):
        res = step(st, lay, batches)
        mem_need = min(mem_need, res.weights_bytes + float(res.kv_bytes[0]))
        ok = res.feasible
        if not ok.any():
            continue
        off = _hopb_off(st, lay, batches, res.ttl, off_cache)
        cols["idx"].append(np.full(ok.sum(), i))
        cols["b"].append(batches[ok])
        cols["ttl"].append(res.ttl[ok])
        cols["g"].append(np.full(ok.sum(), lay.gpus))
        cols["off"].append(off[ok])
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return Sweep(layouts, arrays["idx"].astype(int), arrays["b"], arrays["ttl"], arrays["g"],
                 arrays["off"], len(layouts) * len(batches), mem_need)


def _hopb_off(st, lay: Layout, batches, ttl, cache):
    if lay.hopb == 1:
        return ttl
    base = Layout(lay.kind, lay.kvp, lay.tpa, lay.dpa, lay.tpf, lay.ep, lay.pp, 1)
    if base not in cache:
        cache[base] = step(st, base, batches).ttl
    return cache[base]


def pareto(sw: Sweep) -> np.ndarray:
    """Indices of the Pareto frontier (max tok/s/user and tok/s/GPU), by tok/s/user descending."""
    if not len(sw.ttl):
        return np.zeros(0, dtype=int)
    user, gpu = sw.tok_s_user, sw.tok_s_gpu
    order = np.lexsort((-gpu, -user))
    keep, best = [], -np.inf
    for i in order:
        if gpu[i] > best * (1 + 1e-12):
            keep.append(i)
            best = gpu[i]
    return np.asarray(keep, dtype=int)


def best_gpu_at(sw: Sweep, frontier: np.ndarray, min_user) -> np.ndarray:
    """Best tok/s/GPU among frontier points with tok/s/user >= each of `min_user` (0 if none)."""
    user, gpu = sw.tok_s_user[frontier], sw.tok_s_gpu[frontier]
    min_user = np.atleast_1d(np.asarray(min_user, dtype=float))
    return np.array([gpu[user >= x].max() if (user >= x).any() else 0.0 for x in min_user])


def choose(sw: Sweep, min_user: float | None) -> int | None:
    """Index of the point to run: the most tok/s/GPU meeting `min_user` tok/s/user; without a
    constraint the lowest-latency point (ties: more tok/s/GPU). None if nothing qualifies."""
    if not len(sw.ttl):
        return None
    user, gpu = sw.tok_s_user, sw.tok_s_gpu
    if min_user is None:
        return int(np.lexsort((-gpu, -user))[0])
    ok = np.flatnonzero(user >= min_user * (1 - 1e-9))
    if not len(ok):
        return None
    return int(ok[np.lexsort((-user[ok], -gpu[ok]))[0]])


def launch_line(model, lay: Layout, batch: int) -> str:
    """The SGLang command for a layout (Helix flags from sglang_helix.args), or a note."""
    head = f"python -m sglang.launch_server --model-path {model.hf_id}"
    ep = f" --ep-size {lay.ep}" if lay.ep > 1 else ""
    tail = f" --max-running-requests {batch}"
    if lay.kind == "helix":
        hop = min(lay.hopb, batch)
        # Helix colors whole pages (page size >= 2); 64 matches the single-layer benchmark.
        return (f"{head} --tp-size {lay.attn_group}{ep} --page-size 64 --enable-helix "
                f"--helix-kvp-size {lay.kvp} --helix-tpa-size {lay.tpa} --helix-hopb-slices {hop}{tail}")
    if lay.kind == "tp":
        return f"{head} --tp-size {lay.attn_group}{ep}{tail}"
    if lay.kind == "pp":
        return f"{head} --tp-size {lay.tpa} --pp-size {lay.pp}{ep}{tail}"
    if lay.kind == "ep":
        return f"{head} --tp-size {lay.attn_group} --dp-size {lay.dpa} --enable-dp-attention{ep}{tail}"
    return "# no SGLang launch line: Medha-style KVP with a TP-tied FFN has no SGLang equivalent"


def helix_supported(model) -> bool:
    """Whether the sglang_helix plugin has a Helix path for this architecture."""
    from sglang_helix.args import GQA_ARCHITECTURES, MLA_ARCHITECTURES

    return model.architecture in (MLA_ARCHITECTURES | GQA_ARCHITECTURES)


def sweep_for_gpus(st: Setting, gpus: int, batches, kinds: tuple[str, ...] = KINDS) -> Sweep:
    """Sweep of every layout using exactly `gpus` GPUs; PlanError when there is none."""
    if not 1 <= gpus <= MAX_GPUS:
        raise PlanError(f"--gpus {gpus}: no layout here uses it; give 1..{MAX_GPUS} GPUs per instance")
    lays = layouts_for(st.model, gpus, kinds)
    if not lays:
        raise PlanError(
            f"--gpus {gpus}: no layout of {st.model.name} uses exactly {gpus} GPUs "
            f"(TP/KVP sizes must divide {st.model.num_heads} heads, PP <= {st.model.num_layers} layers); "
            f"try {_nearest_usable(st.model, gpus)}"
        )
    return sweep(st, lays, batches)


def _nearest_usable(model, gpus: int) -> str:
    usable = [g for g in range(max(1, gpus - 64), gpus + 65) if layouts_for(model, g, ("tp", "pp"))]
    near = sorted(usable, key=lambda g: (abs(g - gpus), g))[:2]
    return " or ".join(f"--gpus {g}" for g in sorted(near))


def split_families(sw: Sweep) -> tuple[Sweep, Sweep]:
    """(Helix points, best-baseline points: TP, PP, EP, KVP)."""
    return sw.kinds(("helix",)), sw.kinds(BASELINE_KINDS)
