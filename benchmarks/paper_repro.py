"""The Helix paper's six ratios and three published measurements against the analytic model, and
the model's CPU calibration from committed measurements.

    python benchmarks/paper_repro.py [--no-calibration] [--out-dir docs] [--refresh-probe]
                                     [--compare-mla-exchange]

1. The paper's six ratios (sglang_helix/perf/paper.py: the paper's setting, its definitions, and
   per ratio the one modelling difference that explains a gap, applied and shown), plus the
   abstract's "TTL at fixed batch" wording; writes docs/paper_pareto_{deepseek_r1,llama405b}.png.
2. Published measurements on real hardware (sglang_helix/perf/published.py: source, setup,
   published figure, the model's prediction; nothing fitted), and the same predictions with
   5 us per collective step, to show the model's largest assumption.
3. Calibration, from committed measurements only: with the "cpu" hardware profile in
   --cpu-profile (default docs/results/cpu_profile.json, written by sglang_helix/perf/probe.py's
   measure() when this script runs with --refresh-probe), predicts benchmarks/bench_layer.py's
   DeepSeek-V3 single-layer step (bf16, batch 1, one core per rank) for every layout in the
   --calibration-csv files and prints predicted vs measured (docs/results.md, "Calibration").
4. --compare-mla-exchange: DeepSeek-R1's ratios and fastest Helix points with the MLA exchange
   of latents vs values on the paper's setting, and the a2a bytes per rank per layer.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_helix.perf import paper, published  # noqa: E402
from sglang_helix.perf import search as P  # noqa: E402
from sglang_helix.perf.layouts import Layout, all_layouts  # noqa: E402
from sglang_helix.perf.model import Setting, attention_layer_time, step  # noqa: E402
from sglang_helix.perf.specs import get_model  # noqa: E402

RESULTS = ROOT / "docs" / "results"
CPU_PROFILE = RESULTS / "cpu_profile.json"
CALIBRATION_CSVS = (RESULTS / "helix_vs_tp" / "bench_layer_deepseek-v3_b1.csv",)


def _label(lay: Layout) -> str:
    """A layout's label fit for a Markdown table cell."""
    return lay.label().replace(" | ", ", ")


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if metric == "hopb" else f"{value:.2f}x"


def print_paper_table() -> None:
    print("| model | claim (the paper's words) | paper | model | model / paper | modelling difference "
          "(flip) | model, flipped | status |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- |")
    for r in paper.results():
        c = r.claim
        flip = paper.FLIPS[c.flip].what if (c.flip and r.flipped is not None) else "-"
        print(f"| {c.model} | {c.text} | {_fmt(c.paper, c.metric)} | {_fmt(r.model, c.metric)} | "
              f"{r.model / c.paper:.2f} | {flip} | {_fmt(r.flipped, c.metric)} | {r.status} |")
    ds = paper.paper_sweep("deepseek-r1")
    print(f"\nThe abstract's wording for DeepSeek-R1 (\"reduces TTL by up to 1.5x at fixed batch sizes\"): "
          f"{paper.ttl_at_fixed_batch(ds):.2f}x in this model.")
    for model in ("deepseek-r1", "llama-405b"):
        sw = paper.paper_sweep(model)
        for name, fam in (("Helix", sw.kinds(("helix",))), ("baseline", sw.kinds(paper.PAPER_BASELINE))):
            i = P.choose(fam, None)
            print(f"{model} fastest {name}: {_label(fam.layout(i))}, batch {int(fam.batch[i])}, "
                  f"TTL {fam.ttl[i] * 1e3:.3f} ms")


def print_published_table() -> None:
    print("| measurement | published | predicted | predicted, 5 us per collective step | setup | source | "
          "the prediction assumes |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    base = {p.published.key: p for p in published.predictions()}
    slow = {p.published.key: p for p in published.predictions(latency_scale=5.0)}
    for key, p in base.items():
        pub = p.published
        shown = "not found" if pub.published is None else f"{pub.published:.2f}x"
        print(f"| {pub.what} | {shown} | {p.predicted:.2f}x ({p.detail}) | {slow[key].predicted:.2f}x | "
              f"{pub.setup} | {pub.source} | {pub.assumptions} |")


def plot_paper(out_dir: Path) -> None:
    from sglang_helix.perf.report import plot_sweep

    for model, png, title in (("deepseek-r1", "paper_pareto_deepseek_r1.png", "DeepSeek-R1"),
                              ("llama-405b", "paper_pareto_llama405b.png", "Llama-3.1-405B")):
        plot_sweep(paper.paper_sweep(model), out_dir / png,
                   f"{title}, 1M context, FP4, GB200 NVL72, <= 64 GPUs (model)")
    print(f"wrote {out_dir / 'paper_pareto_deepseek_r1.png'} and {out_dir / 'paper_pareto_llama405b.png'}")


def compare_mla_exchange() -> None:
    """Section 4 of the module doc."""
    print("\nMLA exchange on the paper's setting (DeepSeek-R1, 1M, FP4, GB200, <= 64 GPUs, bf16 partials)")
    print("| mode | max tok/s/user ratio | tok/s/GPU same tok/s/user | HOP-B off loss | fastest Helix: TTL ms, "
          "exchange share |")
    print("| --- | ---: | ---: | ---: | --- |")
    spec = get_model("deepseek-r1")
    for mode in ("latent", "value"):
        st = paper.paper_setting("deepseek-r1")
        lays = [lay for lay in all_layouts(spec, paper.MAX_GPUS, paper.PAPER_BASELINE + ("helix",))
                if lay.kind != "helix" or lay.kvp == 1 or lay.mla_x == mode]
        sw = P.sweep(st, lays, P.batch_grid(8192, per_octave=8))
        helix = sw.kinds(("helix",))
        i = P.choose(helix, None)
        res = step(st, helix.layout(i), [helix.batch[i]])
        print(f"| {mode} | {paper.interactivity(sw):.2f}x | {paper.users(sw):.2f}x | "
              f"{paper.hopb_loss(sw, st) * 100:.1f}% | {_label(helix.layout(i))}, b{int(helix.batch[i])}: "
              f"{res.ttl[0] * 1e3:.3f}, {res.exchange[0] / res.ttl[0] * 100:.1f}% |")
    from sglang_helix.perf.attention import attended_heads, exchange_width

    print("\n| KVP | tokens | latent a2a bytes/rank/layer | value a2a bytes/rank/layer (bf16 partials) |")
    print("| ---: | ---: | ---: | ---: |")
    for kvp, tokens in ((2, 1), (8, 32), (64, 1), (64, 256)):
        lay = Layout("helix", kvp=kvp, tpf=kvp)
        sizes = [tokens * attended_heads(spec, l) * (exchange_width(spec, l) * 2 + 4) * (kvp - 1) / kvp
                 for l in (lay, replace(lay, mla_x="value"))]
        print(f"| {kvp} | {tokens} | {sizes[0]:,.0f} | {sizes[1]:,.0f} |")


def measured_bench(path: Path) -> dict:
    """{(layout, N): {ctx: step ms}} from a bench_layer CSV: the single rank, Helix with the a2a
    exchange and no HOP-B, plain TP."""
    out: dict = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("mla_exchange", "-") != "-":  # --mla-exchange rows also time W_UV
                continue
            kvp, tpa = int(row["kvp"]), int(row["tpa"])
            layout = row.get("layout") or ("1 rank" if kvp * tpa == 1 else "helix")
            if layout == "helix" and (row["backend"] != "a2a" or row["hopb_slices"] != "1" or tpa != 1):
                continue
            ranks = int(row.get("ranks") or kvp * tpa)
            out.setdefault((layout, ranks), {})[int(row["ctx_len"])] = float(row["step_ms"])
    return out


def _sim_layout(layout: str, ranks: int) -> Layout:
    if layout == "tp":
        return Layout("tp", tpa=ranks, tpf=ranks)
    return Layout("helix", kvp=ranks, tpf=ranks)


def load_cpu_profile(path: Path, refresh: bool):
    """The cpu HardwareSpec from the committed probe JSON; --refresh-probe re-measures this
    machine (sglang_helix/perf/probe.py, ~10-20 s) and rewrites the JSON first."""
    from sglang_helix.perf import probe

    if refresh:
        data = probe.measure()  # one torch thread, as one rank
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"measured the cpu profile -> {_rel(path)}")
    if not path.exists():
        raise SystemExit(f"{path} missing: run with --refresh-probe to measure this machine, or --no-calibration")
    return probe.hardware_from_profile(json.loads(path.read_text()))


def calibration(profile: Path, csvs: list[Path], refresh: bool) -> None:
    hw = load_cpu_profile(profile, refresh)
    print(f"\nCalibration: cpu profile {_rel(profile)} = {hw.source}: fp32 matmul "
          f"{hw.flops['fp32'] / 1e9:.1f} GFLOP/s, copy {hw.hbm_bw / 1e9:.1f} GB/s, gloo a2a "
          f"{hw.link_latency * 1e6:.0f} us + {hw.link_bw / 1e9:.2f} GB/s")
    for path in csvs:
        meas = measured_bench(path)
        print(f"\nDeepSeek-V3 single layer, bf16, batch 1, one core per rank; measured = {_rel(path)}")
        print("| ctx | layout | N | predicted ms | measured ms | predicted / measured |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        for (layout, ranks), points in sorted(meas.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            for ctx, ms in sorted(points.items()):
                st = Setting(get_model("deepseek-r1"), hw, ctx, "bf16", "bf16", "activation")
                pred = attention_layer_time(st, _sim_layout(layout, ranks), 1)["step"] * 1e3
                name = {"1 rank": "1 rank", "helix": f"Helix KVP {ranks} a2a", "tp": f"plain TP {ranks}"}[layout]
                print(f"| {ctx} | {name} | {ranks} | {pred:.2f} | {ms:.2f} | {pred / ms:.2f} |")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--refresh-probe", action="store_true",
                    help="re-measure this machine's cpu profile and rewrite --cpu-profile")
    ap.add_argument("--cpu-profile", type=Path, default=CPU_PROFILE,
                    help="probe JSON the calibration predicts with (committed: %(default)s)")
    ap.add_argument("--calibration-csv", type=Path, nargs="+", default=list(CALIBRATION_CSVS),
                    help="bench_layer.py CSVs (DeepSeek-V3, batch 1) to compare with")
    ap.add_argument("--compare-mla-exchange", action="store_true",
                    help="also compare DeepSeek-R1's MLA exchange of latents vs values")
    args = ap.parse_args(argv)
    print_paper_table()
    print()
    print_published_table()
    plot_paper(args.out_dir)
    if args.compare_mla_exchange:
        compare_mla_exchange()
    if not args.no_calibration:
        calibration(args.cpu_profile, args.calibration_csv, args.refresh_probe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
