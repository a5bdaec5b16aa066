"""The planner's search: sweep layouts x batch sizes, Pareto frontiers, the best point of each
layout under an objective.

Throughput-interactivity points as in the Helix paper: tok/s/user = 1 / TTL (TTL = TPOT, the
time per output token of a decode step) and tok/s/GPU = B / TTL / GPUs. No argparse here (the
CLI is `python -m sglang_helix.plan`); launch lines are launch.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import HelixError
from .launch import PRECISIONS, checkpoint, launch, line_weights, plugin_refusal  # noqa: F401 (re-exported)
from .layouts import KINDS, Layout, layouts_for
from .model import Setting, step

MAX_GPUS = 1024  # one instance; beyond this, run replicas
BASELINE_KINDS = ("tp", "pp", "dpa", "kvp")  # the Helix paper's baseline search space
FI_A2A_CHIPS = ("gb200", "gb300", "b200")  # Blackwell: FlashInfer's MNNVL DCP all-to-all


class PlannerError(HelixError, ValueError):
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
        raise PlannerError(f"context {text!r}: use a token count like 65536, 64K or 1M")
    value = float(match.group(1)) * _SUFFIX[match.group(2).upper()]
    if value < 1 or value != int(value):
        raise PlannerError(f"context {text!r}: must be a whole number of tokens >= 1")
    return int(value)


@dataclass
class Sweep:
    """Feasible (layout, batch) points as parallel arrays; `evaluated` counts all configs tried."""

    layouts: list[Layout]
    layout_idx: np.ndarray
    batch: np.ndarray
    ttl: np.ndarray
    gpus: np.ndarray
    memory: np.ndarray  # bytes per GPU
    evaluated: int
    mem_need: float  # smallest memory per GPU at batch 1 over all layouts (bytes)

    @property
    def tok_s_user(self) -> np.ndarray:
        return 1.0 / self.ttl

    @property
    def tok_s_gpu(self) -> np.ndarray:
        return self.batch / self.ttl / self.gpus

    def select(self, mask: np.ndarray) -> Sweep:
        return Sweep(self.layouts, self.layout_idx[mask], self.batch[mask], self.ttl[mask], self.gpus[mask],
                     self.memory[mask], self.evaluated, self.mem_need)

    def where(self, keep) -> Sweep:
        """The points whose layout satisfies `keep(layout)`."""
        wanted = np.array([bool(keep(lay)) for lay in self.layouts], dtype=bool)
        return self.select(wanted[self.layout_idx] if len(self.layout_idx) else np.zeros(0, bool))

    def kinds(self, kinds: tuple[str, ...]) -> Sweep:
        return self.where(lambda lay: lay.kind in kinds)

    def layout(self, i: int) -> Layout:
        return self.layouts[int(self.layout_idx[i])]


def sweep(st: Setting, layouts: list[Layout], batches) -> Sweep:
    """Evaluate every layout at every batch size; keep the points that fit in memory."""
    batches = np.asarray(batches, dtype=float)
    cols = {k: [] for k in ("idx", "b", "ttl", "g", "mem")}
    mem_need = float("inf")
    for i, lay in enumerate(layouts):
        res = step(st, lay, batches)
        mem_need = min(mem_need, float(res.memory_bytes[0]))
        ok = res.feasible
        if not ok.any():
            continue
        cols["idx"].append(np.full(ok.sum(), i))
        cols["b"].append(batches[ok])
        cols["ttl"].append(res.ttl[ok])
        cols["g"].append(np.full(ok.sum(), lay.gpus))
        cols["mem"].append(res.memory_bytes[ok])
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return Sweep(layouts, arrays["idx"].astype(int), arrays["b"], arrays["ttl"], arrays["g"], arrays["mem"],
                 len(layouts) * len(batches), mem_need)


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
    return np.array([gpu[user >= x * (1 - 1e-12)].max() if (user >= x * (1 - 1e-12)).any() else 0.0
                     for x in min_user])


def best_user_at(sw: Sweep, frontier: np.ndarray, min_gpu) -> np.ndarray:
    """Best tok/s/user among frontier points with tok/s/GPU >= each of `min_gpu` (0 if none)."""
    user, gpu = sw.tok_s_user[frontier], sw.tok_s_gpu[frontier]
    min_gpu = np.atleast_1d(np.asarray(min_gpu, dtype=float))
    return np.array([user[gpu >= y * (1 - 1e-12)].max() if (gpu >= y * (1 - 1e-12)).any() else 0.0
                     for y in min_gpu])


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


def sweep_for_gpus(st: Setting, gpus: int, batches, kinds: tuple[str, ...] = KINDS) -> Sweep:
    """Sweep of every layout using exactly `gpus` GPUs; PlannerError when there is none."""
    if not 1 <= gpus <= MAX_GPUS:
        raise PlannerError(f"--gpus {gpus}: no layout here uses it; give 1..{MAX_GPUS} GPUs per instance")
    lays = layouts_for(st.model, gpus, kinds, fi_a2a=st.hw.name in FI_A2A_CHIPS)
    if not lays:
        raise PlannerError(
            f"--gpus {gpus}: no layout of {st.model.name} uses exactly {gpus} GPUs "
            f"(TP sizes must divide {st.model.num_heads} heads, PP <= {st.model.num_layers} layers); "
            f"try {_nearest_usable(st.model, gpus)}"
        )
    return sweep(st, lays, batches)


def _nearest_usable(model, gpus: int) -> str:
    usable = [g for g in range(max(1, gpus - 64), gpus + 65) if layouts_for(model, g, ("tp", "pp"))]
    near = sorted(usable, key=lambda g: (abs(g - gpus), g))[:2]
    return " or ".join(f"--gpus {g}" for g in sorted(near))


def split_families(sw: Sweep) -> tuple[Sweep, Sweep]:
    """(Helix points, the Helix paper's baseline points: TP, PP, DP attention, Medha KVP)."""
    return sw.kinds(("helix",)), sw.kinds(BASELINE_KINDS)
