"""The planner's printed answer (ranking table, Helix vs --dcp-size, the winner's launch line) and
its PNG of the per-family throughput-interactivity frontiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .model import step
from .ranking import FAMILY_NAMES, Ranking, Row, accepted_setting, top_rows
from .search import pareto, sweep

HEADER = (f"{'rank':>4} {'family':<13} {'layout':<50} {'B':>5} {'TPOT ms':>8} {'tok/s/user':>10} "
          f"{'tok/s/GPU':>10} {'max conc':>8} {'GB/GPU':>7}  note")


def fmt_row(rank: int, r: Row) -> str:
    return (f"{rank:>4} {FAMILY_NAMES[r.family]:<13} {r.layout.label():<50} {r.batch:>5} {r.ttl * 1e3:>8.3f} "
            f"{r.tok_s_user:>10.1f} {r.tok_s_gpu:>10.2f} {r.max_concurrency:>8} {r.memory_bytes / 1e9:>7.1f}  {r.note}")


def header_lines(st, gpus: int, ranking: Ranking) -> list[str]:
    weights = st.weights
    if st.model.mla and st.weights == "fp4":
        weights += f" (MLA projections {st.fp4_mla_projections})"
    return [
        f"Helix planner: {st.model.name} ({st.model.hf_id}), context {st.context} tokens, {gpus} x "
        f"{st.hw.name} ({st.hw.source}), weights {weights}, KV {st.kv}, Helix exchange {st.exchange_dtype}",
        f"objective: {ranking.objective}; {ranking.evaluated} (layout, batch) points; analytic roofline "
        "(sglang_helix/perf), not a measurement",
    ]


def comparison_line(ranking: Ranking) -> str:
    """Helix vs --dcp-size (the question the planner answers) at the objective."""
    h, d = ranking.best("helix"), ranking.best("dcp")
    if h is None or d is None:
        kind = "helix" if h is None else "dcp"
        return f"Helix vs --dcp-size: {FAMILY_NAMES[kind]} {_why_missing(ranking, kind)}"
    tput = ranking.objective.startswith("most")
    what = "tok/s/GPU" if tput else "TPOT"
    line = f"Helix vs --dcp-size ({what}): {_versus(h, d, tput)}"
    rival = ranking.dcp_at_helix_dtypes
    if rival is not None:
        line += (f"; at Helix's {h.setting.weights} weights / {h.setting.kv} KV: "
                 f"{_versus(h, rival, tput)}")
    return line


def _versus(h: Row, d: Row, tput: bool) -> str:
    hv, dv = (h.tok_s_gpu, d.tok_s_gpu) if tput else (1 / h.ttl, 1 / d.ttl)
    winner, ratio = ("Helix", hv / dv) if hv >= dv else ("--dcp-size", dv / hv)
    hs = f"{h.tok_s_gpu:.2f} tok/s/GPU" if tput else f"{h.ttl * 1e3:.3f} ms"
    ds = f"{d.tok_s_gpu:.2f} tok/s/GPU" if tput else f"{d.ttl * 1e3:.3f} ms"
    return f"Helix {hs} vs --dcp-size {ds}: {winner} by {ratio:.2f}x"


def _why_missing(ranking: Ranking, kind: str) -> str:
    if kind in ranking.absent:
        if kind == "dcp":
            return ("has no layout here: DCP must divide TP and, for GQA, (TP / KV heads) % DCP == 0 "
                    "(DCP only shards what TP duplicates)")
        return "has no layout on this many GPUs"
    if kind in ranking.refused and ranking.best(kind) is None:
        return "is refused by sglang_helix at every dtype (above)"
    return "has no layout that fits in memory and meets the objective"


def ranking_lines(st, gpus: int, ranking: Ranking) -> list[str]:
    """Everything the planner prints for one ranking."""
    out = header_lines(st, gpus, ranking) + ["", HEADER]
    position = {id(r): i + 1 for i, r in enumerate(ranking.rows)}
    out += [fmt_row(position[id(r)], r) for r in top_rows(ranking)]
    out.append("")
    for kind in ranking.kinds:
        if ranking.best(kind) is None and kind not in ranking.refused:
            out.append(f"{FAMILY_NAMES[kind]}: {_why_missing(ranking, kind)}")
    for kind, reason in sorted(ranking.refused.items()):
        fallback = ranking.best(kind)
        tail = f"; ranked at {fallback.setting.weights} weights / {fallback.setting.kv} KV" if fallback else ""
        out.append(f"Refused by sglang_helix ({FAMILY_NAMES[kind]} at {st.weights} weights / {st.kv} KV): "
                   f"{reason}{tail}")
    out.append(comparison_line(ranking))
    out += breakdown_lines([r for r in (ranking.best("helix"), ranking.dcp_at_helix_dtypes or ranking.best("dcp"))
                            if r is not None])
    win = ranking.winner
    if win is None:
        out.append("No layout with an SGLang launch line meets the objective; add GPUs, shorten the context "
                   "or relax the objective")
        return out
    out.append(f"Winner: {FAMILY_NAMES[win.family]}, {win.layout.label()}, batch {win.batch}: TPOT "
               f"{win.ttl * 1e3:.3f} ms, {win.tok_s_gpu:.2f} tok/s/GPU")
    out += ["Launch:", "  " + win.launch.line] + ([f"  # {win.launch.note}"] if win.launch.note else [])
    helix = ranking.best("helix")
    if helix is not None and helix is not win:
        out += [f"Best Helix (rank {position[id(helix)]}):", "  " + helix.launch.line]
    return out


def breakdown_lines(rows: list[Row]) -> list[str]:
    """Where each row's step goes (all layers, ms) and what it holds: the reasons behind Helix vs
    --dcp-size (q projected or all-gathered, exchange and HOP-B, KV shard and page)."""
    if len(rows) < 2:
        return []
    from . import memory
    from .attention import projected_q_heads

    out = [f"  {'':<13} {'KV read':>8} {'q gather + exchange':>19} {'attention side':>14} "
           f"{'o_proj + FFN':>12} {'q heads projected':>17} {'KV MB/request/GPU':>17} {'page':>5}"]
    for r in rows:
        st, lay = r.setting, r.layout
        res = step(st, lay, np.array([float(r.batch)]))
        page = memory.page_size(st.model, lay) * (lay.kvp if lay.kind == "dcp" else 1)
        out.append(f"  {FAMILY_NAMES[r.family]:<13} {res.kv_read[0] * 1e3:>8.3f} {res.exchange[0] * 1e3:>19.3f} "
                   f"{res.attention[0] * 1e3:>14.3f} {res.ffn[0] * 1e3:>12.3f} "
                   f"{projected_q_heads(st.model, lay):>17g} {memory.kv_bytes_per_request(st, lay) / 1e6:>17.1f} "
                   f"{page:>5}")
    return out


_STYLES = {"helix": ("Helix", "k", "-"), "dcp": ("--dcp-size", "C3", "-"), "tp": ("plain TP", "C0", "--"),
           "dpa": ("DP attention", "C2", "--"), "pp": ("PP", "C1", ":"), "kvp": ("Medha KVP", "C4", ":")}


def plot_frontiers(st, gpus: int, batches, kinds, path: Path, title: str) -> None:
    """PNG of each family's Pareto frontier (tok/s/user vs tok/s/GPU) on `gpus` GPUs, each family
    at the dtypes its launch lines are accepted at."""
    from .layouts import layouts_for
    from .search import FI_A2A_CHIPS

    sweeps = {}
    for kind in kinds:
        lays = layouts_for(st.model, gpus, (kind,), fi_a2a=st.hw.name in FI_A2A_CHIPS)
        cand = accepted_setting(st, lays[0])[0] if lays else None
        if cand is not None:
            sweeps[kind] = sweep(cand, lays, batches)
    _draw(sweeps, path, title)


def plot_sweep(sw, path: Path, title: str) -> None:
    """PNG of the frontier of every layout family in one sweep."""
    kinds = sorted({lay.kind for lay in sw.layouts}, key=list(_STYLES).index)
    _draw({kind: sw.kinds((kind,)) for kind in kinds}, path, title)


def _draw(sweeps: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for kind, sw in sweeps.items():
        f = pareto(sw)
        if len(f):
            label, color, ls = _STYLES[kind]
            ax.plot(sw.tok_s_user[f], sw.tok_s_gpu[f], ls, color=color, marker=".", label=label,
                    lw=2.2 if kind == "helix" else 1.2, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s/user (1 / TPOT)")
    ax.set_ylabel("tokens/s/GPU")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
