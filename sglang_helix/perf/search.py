"""The planner's search: sweep layouts x batch sizes, Pareto frontiers, the chosen layout, its
launch line.

Throughput-interactivity points as in the Helix paper: tok/s/user = 1 / TTL and
tok/s/GPU = B / TTL / GPUs. No argparse here (the CLI is `python -m sglang_helix.plan`).
Every launch line is checked with the plugin's own launch rules (sglang_helix.rules.check_launch,
`plugin_refusal`): a line the plugin would refuse is never offered.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .layouts import BASELINE_KINDS, KINDS, Layout, layouts_for
from .model import Setting, step
from ..config import HelixConfigError
from ..errors import HelixError
from ..rules.argv import check_argv
from ..rules.model import ModelInfo


MAX_GPUS = 1024  # one instance; beyond this, run replicas


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


# Weights of each model's upstream checkpoint (ModelSpec.hf_id), from its config.json:
# DeepSeek-R1 and Kimi-K2 ship block-fp8 weights (quantization_config fp8), the others bf16.
CHECKPOINT_WEIGHTS = {"deepseek-r1": "fp8", "kimi-k2": "fp8"}  # absent: bf16
PRECISIONS = ("fp4", "fp8", "bf16")


@dataclass(frozen=True)
class Checkpoint:
    """What a launch line serves for weights at one precision."""

    model_path: str
    weights: str  # dtype of the served weights (attention projections included)
    quantization: str | None = None  # SGLang --quantization (online quantization at load)
    note: str = ""  # how to get model_path when it is not on the hub


def checkpoint(model, precision: str) -> Checkpoint:
    """The checkpoint a launch line names for `model` with `precision` weights: the upstream one
    at its own dtype; a bf16 one quantized to fp8 at load (SGLang `--quantization fp8`); else a
    local copy at `precision` (./<name>-<precision>, with a note on how to make it)."""
    native = CHECKPOINT_WEIGHTS.get(model.name, "bf16")
    if precision == native:
        return Checkpoint(model.hf_id, native)
    if precision == "fp8" and native == "bf16":
        return Checkpoint(model.hf_id, "fp8", quantization="fp8")
    local = f"./{model.hf_id.rsplit('/', 1)[-1]}-{precision}"
    how = (f"dequantize its {native} weights, e.g. with DeepSeek-V3's inference/fp8_cast_bf16.py"
           if precision == "bf16" else "e.g. an NVFP4 export made with NVIDIA ModelOpt")
    article = "an" if precision[0] == "f" else "a"  # "an fp4", "a bf16"
    return Checkpoint(local, precision, note=f"{local}: {article} {precision} copy of {model.hf_id} ({how})")


def line_weights(model, argv) -> str | None:
    """Dtype of the weights a launch line serves (the inverse of `checkpoint`); None if unknown."""
    path, quant = _flag_value(argv, "--model-path"), _flag_value(argv, "--quantization")
    for precision in PRECISIONS:
        ck = checkpoint(model, precision)
        if (ck.model_path, ck.quantization) == (path, quant):
            return ck.weights
    return None


def _flag_value(argv, flag: str) -> str | None:
    argv = list(argv)
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


@dataclass(frozen=True)
class Launch:
    """An SGLang launch line as argv (empty: the layout has no SGLang equivalent) + a note."""

    argv: tuple[str, ...]
    note: str = ""

    @property
    def line(self) -> str:
        return shlex.join(self.argv)


def launch(st: Setting, lay: Layout, batch: int) -> Launch:
    """The SGLang command for a layout at `st`'s precision (Helix flags of sglang_helix.rules.flags).

    Helix lines leave --page-size out (the plugin then uses 64) and name an attention backend
    the plugin accepts where SGLang's default might not be one: torch_native on CPU; flashinfer
    for GQA on GPU (SGLang 0.5.23 defaults GQA to trtllm_mha on Blackwell, which has no Helix
    path; the helix backend runs flashinfer kernels first anyway). MLA keeps SGLang's default
    (fa3 on Hopper, flashinfer on Blackwell, triton elsewhere: all accepted)."""
    if lay.kind == "kvp":
        return Launch((), "# no SGLang launch line: Medha-style KVP with a TP-tied FFN has no SGLang equivalent")
    ck = checkpoint(st.model, st.precision)
    cpu = st.hw.name == "cpu"
    argv = ["python", "-m", "sglang.launch_server", "--model-path", ck.model_path]
    argv += ["--quantization", ck.quantization] if ck.quantization else []
    argv += ["--device", "cpu"] if cpu else []
    ep = ["--ep-size", str(lay.ep)] if lay.ep > 1 else []
    if lay.kind == "helix":
        backend = "torch_native" if cpu else None if st.model.mla else "flashinfer"
        argv += ["--tp-size", str(lay.attn_group), *ep]
        argv += ["--attention-backend", backend] if backend else []
        argv += ["--enable-helix", "--helix-kvp-size", str(lay.kvp), "--helix-tpa-size", str(lay.tpa),
                 "--helix-hopb-slices", str(min(lay.hopb, batch))]
    elif lay.kind == "tp":
        argv += ["--tp-size", str(lay.attn_group), *ep]
    elif lay.kind == "pp":
        argv += ["--tp-size", str(lay.tpa), "--pp-size", str(lay.pp), *ep]
    else:  # ep: DP attention
        argv += ["--tp-size", str(lay.attn_group), "--dp-size", str(lay.dpa), "--enable-dp-attention", *ep]
    argv += ["--max-running-requests", str(batch)]
    return Launch(tuple(argv), ck.note)


def plugin_refusal(model, argv: Sequence[str]) -> str | None:
    """Why sglang_helix would refuse this launch line (rules.check_launch on the line's flags, the
    model's heads and experts, the weights it serves), or None if it accepts it."""
    info = ModelInfo(model.architecture, model.num_heads, model.num_kv_heads, model.mla,
                     model.num_experts)
    try:
        check_argv(argv, info, line_weights(model, argv))
    except HelixConfigError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Alternative:
    """An accepted point offered instead of a refused one; `what` says how it differs."""

    setting: Setting
    sweep: Sweep
    index: int
    what: str

    @property
    def launch(self) -> Launch:
        return launch(self.setting, self.sweep.layout(self.index), int(self.sweep.batch[self.index]))


def refusal(st: Setting, sw: Sweep, i: int) -> str | None:
    """Why the plugin would refuse point i's launch line (None: accepted or no SGLang line)."""
    ln = launch(st, sw.layout(i), int(sw.batch[i]))
    return plugin_refusal(st.model, ln.argv) if ln.argv else None


def nearest_accepted(st: Setting, sw: Sweep, pick: int, batches,
                     min_user: float | None) -> Alternative | None:
    """The accepted point nearest a refused pick, meeting the same objective where one does:
    the same layout with wider weights (fp4 -> fp8, then bf16); else the best accepted layout at
    st's precision; else the best accepted layout with wider weights; else the fastest accepted
    one (objective missed)."""
    for setting, cand, need, what in _candidates(st, sw, pick, batches, min_user):
        i = choose(cand, need)
        if i is not None and refusal(setting, cand, i) is None:
            return Alternative(setting, cand, i, what)
    return None


def _wider(st: Setting) -> list[Setting]:
    """st at each wider weight precision the hardware runs (fp4 -> fp8, bf16; fp8 -> bf16)."""
    later = PRECISIONS[PRECISIONS.index(st.precision) + 1:]
    return [replace(st, precision=p) for p in later if p in st.hw.flops]


def _candidates(st: Setting, sw: Sweep, pick: int, batches, min_user):
    """(setting, points, tok/s/user floor, description) in order of preference, built lazily."""
    wider = _wider(st)
    for w in wider:
        yield (w, sweep(w, [sw.layout(pick)], batches), min_user,
               f"the same layout with {w.precision} weights")
    accepted = _accepted(st, sw)
    yield st, accepted, min_user, f"the best accepted layout at {st.precision}"
    for w in wider:
        yield (w, _accepted(w, sweep(w, sw.layouts, batches)), min_user,
               f"the best accepted layout with {w.precision} weights")
    if min_user is not None:
        yield st, accepted, None, f"the fastest accepted layout at {st.precision} (misses the objective)"


def best_accepted(st: Setting, sw: Sweep, min_user: float | None) -> Alternative | None:
    """The point `choose` picks among those whose launch line the plugin accepts, or None."""
    accepted = _accepted(st, sw)
    i = choose(accepted, min_user)
    return None if i is None else Alternative(st, accepted, i, f"the best accepted layout at {st.precision}")


def _accepted(st: Setting, sw: Sweep) -> Sweep:
    """The points whose SGLang launch line the plugin accepts (one verdict per layout, at its
    largest batch: the line differs across batches only in counts the rules do not read)."""
    verdict = {}
    for li in np.unique(sw.layout_idx):
        rows = np.flatnonzero(sw.layout_idx == li)
        ln = launch(st, sw.layouts[int(li)], int(sw.batch[rows].max()))
        verdict[int(li)] = bool(ln.argv) and plugin_refusal(st.model, ln.argv) is None
    return sw.select(np.array([verdict[int(li)] for li in sw.layout_idx], dtype=bool))


def sweep_for_gpus(st: Setting, gpus: int, batches, kinds: tuple[str, ...] = KINDS) -> Sweep:
    """Sweep of every layout using exactly `gpus` GPUs; PlannerError when there is none."""
    if not 1 <= gpus <= MAX_GPUS:
        raise PlannerError(f"--gpus {gpus}: no layout here uses it; give 1..{MAX_GPUS} GPUs per instance")
    lays = layouts_for(st.model, gpus, kinds)
    if not lays:
        raise PlannerError(
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
