"""bench_layer's outputs: one Row per (layout, context, backend, HOP-B, MLA exchange, KV dtype),
the KV-bytes ratio of each --kv-dtype row, the printed table, Markdown, CSV and the PNG plot."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_layer_ranks import DTYPES, HELIX, PLAIN_TP, SINGLE


@dataclass
class Row:
    model: str
    layout: str  # "1 rank" | "helix" | "tp"
    ranks: int  # N: ranks running the layer's attention
    ctx_len: int
    batch: int
    kvp: int
    tpa: int  # plain TP rows: the TP size N
    backend: str
    hopb_slices: int
    attn_ms: float
    exchange_ms: float
    merge_ms: float
    step_ms: float
    exch_only_ms: float
    bytes_per_rank: int  # exchange bytes one rank sends per step (0 without exchange)
    kv_bytes_per_rank: int  # KV bytes one rank reads per step (one layer, whole batch), max rank
    tpot_ms: float
    mla_exchange: str = "-"  # "latent" | "value" with --mla-exchange (W_UV timed), else "-"
    wuv_ms: float = 0.0  # W_UV time inside step_ms (value: before the exchange; latent: after)
    kv_dtype: str = "-"  # with --kv-dtype: the pages' dtype ("bf16", "fp8_e4m3", ...), else "-"
    kv_cache_bytes_per_rank: int = 0  # bytes of the cache tensors one rank holds (max rank)
    kv_ratio: float = float("nan")  # KV bytes read / the same row's with KV in --dtype


def _case_key(r: Row) -> tuple:
    return (r.layout, r.ranks, r.kvp, r.tpa, r.ctx_len, r.backend, r.hopb_slices, r.mla_exchange)


def set_kv_ratios(rows: list[Row], dtype: str) -> None:
    """kv_ratio of every --kv-dtype row: its KV bytes read over the same case's --dtype row's."""
    base = {_case_key(r): r.kv_bytes_per_rank for r in rows if r.kv_dtype == dtype}
    for r in rows:
        if r.kv_dtype != "-" and base.get(_case_key(r)):
            r.kv_ratio = r.kv_bytes_per_rank / base[_case_key(r)]


def layout_label(r: Row) -> str:
    if r.layout == PLAIN_TP:
        return f"plain TP {r.ranks}"
    if r.layout == SINGLE:
        return "1 rank"
    tpa = f" x TPA {r.tpa}" if r.tpa > 1 else ""
    return f"Helix KVP {r.kvp}{tpa}"


def _with_w_uv(rows: list[Row]) -> bool:
    """True when the rows were run with --mla-exchange (extra columns: MLA exchange, W_UV ms)."""
    return any(r.mla_exchange != "-" for r in rows)


def _with_kv_dtype(rows: list[Row]) -> bool:
    """True when the rows were run with --kv-dtype (extra columns: KV dtype, KV vs --dtype)."""
    return any(r.kv_dtype != "-" for r in rows)


def _base_dtype(rows: list[Row]) -> str:
    return next((r.kv_dtype for r in rows if r.kv_dtype in DTYPES), "bf16")


def print_table(rows: list[Row]) -> None:
    mla = _with_w_uv(rows)
    head = f"{'layout':>16} {'N':>2} {'ctx':>7} {'backend':>7} {'hopb':>4} {'attn ms':>9} {'exch ms':>8} " \
           f"{'merge ms':>8} {'step ms':>9} {'x-only ms':>9} {'exch B/rank':>11} {'KV B/rank':>12} {'TPOT ms':>9}"
    head += f" {'MLA x':>6} {'W_UV ms':>8}" if mla else ""
    kv = _with_kv_dtype(rows)
    head += f" {'KV dtype':>9} {'KV vs ' + _base_dtype(rows):>10}" if kv else ""
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = f" {r.mla_exchange:>6} {r.wuv_ms:>8.3f}" if mla else ""
        extra += f" {r.kv_dtype:>9} {r.kv_ratio:>10.2f}" if kv else ""
        print(f"{layout_label(r):>16} {r.ranks:>2} {r.ctx_len:>7} {r.backend:>7} {r.hopb_slices:>4} "
              f"{r.attn_ms:>9.2f} {r.exchange_ms:>8.3f} {r.merge_ms:>8.3f} {r.step_ms:>9.2f} "
              f"{r.exch_only_ms:>9.3f} {r.bytes_per_rank:>11} {r.kv_bytes_per_rank:>12} {r.tpot_ms:>9.1f}"
              + extra)


def _ratio(num: float, den) -> str:
    return "-" if den is None else f"{num / den:.2f}"


def markdown_table(rows: list[Row]) -> str:
    """The printed table as Markdown, for docs/results.md."""
    mla, kv = _with_w_uv(rows), _with_kv_dtype(rows)
    lines = ["| layout | N | ctx | backend | HOP-B | attn ms | exch ms | merge ms | step ms | exch-only ms "
             "| exch bytes/rank/step | KV bytes/rank/step | step vs 1 rank | step vs plain TP N |"
             + (" MLA exchange | W_UV ms |" if mla else "")
             + (f" KV dtype | KV bytes vs {_base_dtype(rows)} | KV cache bytes/rank |" if kv else ""),
             "|" + "---|" * (14 + 2 * mla + 3 * kv)]
    single = {(r.ctx_len, r.batch, r.kv_dtype): r.step_ms for r in rows if r.layout == SINGLE}
    plain = {(r.ctx_len, r.batch, r.ranks, r.kv_dtype): r.step_ms for r in rows if r.layout == PLAIN_TP}
    for r in rows:
        vs1 = _ratio(r.step_ms, single.get((r.ctx_len, r.batch, r.kv_dtype)))
        vs_tp = _ratio(r.step_ms, plain.get((r.ctx_len, r.batch, r.ranks, r.kv_dtype)))
        lines.append(f"| {layout_label(r)} | {r.ranks} | {r.ctx_len} | {r.backend} | {r.hopb_slices} | "
                     f"{r.attn_ms:.2f} | {r.exchange_ms:.3f} | {r.merge_ms:.3f} | {r.step_ms:.2f} | "
                     f"{r.exch_only_ms:.3f} | {r.bytes_per_rank:,} | {r.kv_bytes_per_rank:,} | {vs1} | {vs_tp} |"
                     + (f" {r.mla_exchange} | {r.wuv_ms:.3f} |" if mla else "")
                     + (f" {r.kv_dtype} | {r.kv_ratio:.2f} | {r.kv_cache_bytes_per_rank:,} |" if kv else ""))
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Row], out_dir: Path, stem: str) -> list[Path]:
    """CSV, Markdown table and PNG plot of the rows; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    fields = list(asdict(rows[0]))
    if not _with_w_uv(rows):  # runs without --mla-exchange keep the columns they always had
        fields = [f for f in fields if f not in ("mla_exchange", "wuv_ms")]
    if not _with_kv_dtype(rows):  # likewise without --kv-dtype
        fields = [f for f in fields if f not in ("kv_dtype", "kv_cache_bytes_per_rank", "kv_ratio")]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md_path.write_text(markdown_table(rows))
    _plot(rows, png_path)
    return [csv_path, md_path, png_path]


def _series_label(r: Row) -> str:
    label = layout_label(r)
    if r.layout == HELIX and r.kvp > 1:
        label += f" {r.backend}"
        label += f" {r.mla_exchange}" if r.mla_exchange != "-" else ""
    label += f" KV {r.kv_dtype}" if r.kv_dtype != "-" else ""
    return label + (f" HOP-B {r.hopb_slices}" if r.hopb_slices > 1 else "")


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_kv) = plt.subplots(1, 2, figsize=(12, 4.5))
    order = {SINGLE: 0, HELIX: 1, PLAIN_TP: 2}
    key = lambda r: (order[r.layout], r.ranks, r.kvp, r.backend, r.hopb_slices, r.mla_exchange,  # noqa: E731
                     r.kv_dtype)
    for o, ranks, kvp, backend, slices, mode, kv_dtype in sorted({key(r) for r in rows}):
        sel = sorted((r for r in rows if key(r) == (o, ranks, kvp, backend, slices, mode, kv_dtype)),
                     key=lambda r: r.ctx_len)
        # 1 rank: hollow circles, plain TP: dashed crosses (they overlap in the KV panel for MLA)
        style = [dict(ls="-", marker="o", ms=9, mfc="none"), dict(ls="-", marker="o"),
                 dict(ls="--", marker="x", ms=8)][o]
        xs = [r.ctx_len for r in sel]
        ax.plot(xs, [r.step_ms for r in sel], label=_series_label(sel[0]), **style)
        if slices == 1 and backend in ("-", "a2a") and mode in ("-", "latent"):
            kv_label = layout_label(sel[0]) + (f" KV {kv_dtype}" if kv_dtype != "-" else "")
            ax_kv.plot(xs, [r.kv_bytes_per_rank / 2**20 for r in sel], label=kv_label, **style)
    for a in (ax, ax_kv):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context length (tokens)")
        a.grid(True, alpha=0.3)
        a.legend()
    ax.set_ylabel("single-layer decode step (ms)")
    ax_kv.set_ylabel("KV read per rank per step (MiB)")
    fig.suptitle(f"{rows[0].model}, batch {rows[0].batch}, one CPU core per rank: "
                 f"Helix vs plain TP vs 1 rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
