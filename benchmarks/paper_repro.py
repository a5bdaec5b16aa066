"""Reproduce the Helix paper's headline ratios with the analytic model, and calibrate it on CPU.

    python benchmarks/paper_repro.py [--no-calibration] [--out-dir docs] [--refresh-probe]
                                     [--mla-exchange {latent,value}] [--compare-mla-exchange]

1. Sweeps DeepSeek-R1 and Llama-3.1-405B at 1M context, FP4, GB200 NVL72, 1..64 GPUs, every
   TP / PP / EP / KVP / Helix layout x a dense batch grid; prints the paper's claims next to the
   simulator's numbers (also with collective latency set to 0) and writes
   docs/paper_pareto_deepseek_r1.png and docs/paper_pareto_llama405b.png.
2. Calibration, from committed measurements only: with the "cpu" hardware profile in
   --cpu-profile (default docs/results/cpu_profile.json, written by sglang_helix/perf/probe.py's
   measure() when this script runs with --refresh-probe), predicts benchmarks/bench_layer.py's
   DeepSeek-V3 single-layer step (bf16, batch 1, one core per rank) for every layout in the
   --calibration-csv files (default docs/results/helix_vs_tp/bench_layer_deepseek-v3_b1.csv:
   1 rank, Helix KVP 2 a2a, plain TP 2) and prints predicted vs measured. The commands that
   produced the committed files are in docs/results.md ("Calibration on this machine").
3. --compare-mla-exchange: DeepSeek-R1's metrics, fastest Helix TTL and exchange share with the MLA
   exchange of latents vs values (docs/math.md section 4), the a2a bytes per rank per layer and
   the replicated W_UV memory per GPU. --mla-exchange sets the mode of section 1 (MLA only).

Metric definitions ("up to" = the maximum over the swept range):
- TTL at fixed batch: for each batch size, best baseline TTL / best Helix TTL; max over batches.
- users (throughput) at the same latency: Helix tok/s/GPU / baseline tok/s/GPU, both the best
  frontier point with tok/s/user >= x; max over x within the baseline's range.
- interactivity: max Helix tok/s/user / max baseline tok/s/user.
- HOP-B off: 1 - TTL(HOP-B) / TTL(HOP-B off) over the Helix frontier points; max.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_helix.perf import search as P  # noqa: E402
from sglang_helix.perf.layouts import Layout, all_layouts  # noqa: E402
from sglang_helix.config import DEFAULT_MLA_EXCHANGE, MLA_EXCHANGES  # noqa: E402
from sglang_helix.perf.model import (  # noqa: E402
    Setting, attention_layer_time, helix_exchange_bytes, step, w_uv_params)
from sglang_helix.perf.specs import get_hardware, get_model  # noqa: E402

CONTEXT = 1 << 20
MAX_GPUS = 64
# Paper (arXiv 2507.07120) headline claims, GB200 NVL72, FP4, 1M context.
PAPER = {
    ("deepseek-r1", "ttl_fixed_batch"): 1.5,
    ("deepseek-r1", "users_same_latency"): 32.0,
    ("llama-405b", "interactivity"): 1.13,
    ("llama-405b", "users_same_latency"): 4.0,
    ("llama-405b", "hopb_off_loss"): 0.12,
    ("deepseek-r1", "hopb_off_loss"): 0.01,
}
LABELS = {
    "ttl_fixed_batch": "TTL reduction at fixed batch (up to)",
    "users_same_latency": "tok/s/GPU at same tok/s/user (up to)",
    "interactivity": "max tok/s/user ratio",
    "hopb_off_loss": "tok/s/user lost with HOP-B off (max)",
}
RESULTS = ROOT / "docs" / "results"
CPU_PROFILE = RESULTS / "cpu_profile.json"
CALIBRATION_CSVS = (RESULTS / "helix_vs_tp" / "bench_layer_deepseek-v3_b1.csv",)


def run_sweep(model: str, latency_scale: float = 1.0,
              mla_exchange: str = DEFAULT_MLA_EXCHANGE) -> P.Sweep:
    st = Setting(get_model(model), get_hardware("gb200"), CONTEXT, "fp4", latency_scale,
                 mla_exchange)
    return P.sweep(st, all_layouts(st.model, MAX_GPUS), P.batch_grid(8192, per_octave=8))


def metrics(sw: P.Sweep) -> dict:
    """The four ratios defined in the module docstring."""
    helix, base = P.split_families(sw)
    fh, fb = P.pareto(helix), P.pareto(base)
    fixed = [base.ttl[base.batch == b].min() / helix.ttl[helix.batch == b].min()
             for b in np.unique(sw.batch) if (base.batch == b).any() and (helix.batch == b).any()]
    xs = np.unique(np.concatenate([helix.tok_s_user[fh], base.tok_s_user[fb]]))
    xs = xs[xs <= base.tok_s_user.max()]
    users = P.best_gpu_at(helix, fh, xs) / P.best_gpu_at(base, fb, xs)
    loss = 1.0 - helix.ttl[fh] / helix.hopb_off_ttl[fh]
    return {
        "ttl_fixed_batch": max(fixed),
        "users_same_latency": float(users.max()),
        "interactivity": float(helix.tok_s_user.max() / base.tok_s_user.max()),
        "hopb_off_loss": float(loss.max()),
    }


def print_paper_table(results: dict, zero_lat: dict) -> None:
    print("| model | claim | paper | simulator | sim / paper | within +-20% | simulator, latency 0 |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for (model, key), paper in PAPER.items():
        sim, sim0 = results[model][key], zero_lat[model][key]
        ok = "yes" if abs(sim / paper - 1) <= 0.2 else "no"
        fmt = (lambda v: f"{v * 100:.1f}%") if key == "hopb_off_loss" else (lambda v: f"{v:.2f}x")
        print(f"| {model} | {LABELS[key]} | {fmt(paper)} | {fmt(sim)} | {sim / paper:.2f} | {ok} | {fmt(sim0)} |")


def compare_mla_exchange(model: str = "deepseek-r1") -> None:
    """Section 3 of the module doc: the same sweep with latent and value MLA exchange."""
    spec = get_model(model)
    print(f"\nMLA exchange, {model}, 1M context, FP4, GB200 NVL72, <= {MAX_GPUS} GPUs (simulated)")
    print("| mode | TTL at fixed batch | tok/s/GPU same tok/s/user | max tok/s/user ratio "
          "| HOP-B off loss | fastest Helix: TTL ms, exchange share | most tok/s/GPU Helix: "
          "TTL ms, exchange share |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for mode in MLA_EXCHANGES:
        sw = run_sweep(model, mla_exchange=mode)
        met, (helix, _) = metrics(sw), P.split_families(sw)
        st = Setting(spec, get_hardware("gb200"), CONTEXT, "fp4", 1.0, mode)
        points = []
        for i in (P.choose(helix, None), int(np.argmax(helix.tok_s_gpu))):
            lay, batch = helix.layout(i), helix.batch[i]
            res = step(st, lay, [batch])
            points.append(f"{lay.label().replace(' | ', ', ')} b{int(batch)}: {res.ttl[0] * 1e3:.3f}, "
                          f"{res.exchange[0] / res.ttl[0] * 100:.1f}%")
        print(f"| {mode} | {met['ttl_fixed_batch']:.2f}x | {met['users_same_latency']:.2f}x | "
              f"{met['interactivity']:.2f}x | {met['hopb_off_loss'] * 100:.1f}% | "
              f"{points[0]} | {points[1]} |")
    batches = (1, 8, 64, 512, 2048)
    print("\nTTL value / latent of one layout (< 1: values faster; '-': does not fit in memory)")
    print("| context | layout | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("| --- | --- |" + " ---: |" * len(batches))
    for ctx in (CONTEXT, 1 << 16):
        for hopb in (1, 4):
            lay = Layout("helix", kvp=MAX_GPUS, tpf=8, ep=8, hopb=hopb)
            lat, val = (step(Setting(spec, get_hardware("gb200"), ctx, "fp4", 1.0, mode), lay, batches)
                        for mode in MLA_EXCHANGES)
            cells = [f"{v / t:.3f}" if ok else "-" for t, v, ok in zip(lat.ttl, val.ttl, val.feasible)]
            print(f"| {ctx // 1024}K | {lay.label().replace(' | ', ', ')} | " + " | ".join(cells) + " |")
    print("\n| KVP | tokens | latent a2a bytes/rank/layer | value a2a bytes/rank/layer | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for kvp, tokens in ((2, 1), (8, 32), (64, 1), (64, 256)):
        lay = Layout("helix", kvp=kvp, tpf=kvp)
        lat, val = (helix_exchange_bytes(spec, lay, tokens, m) for m in MLA_EXCHANGES)
        print(f"| {kvp} | {tokens} | {lat:,.0f} | {val:,.0f} | {lat / val:.2f} |")
    per_layer = w_uv_params(spec)
    print(f"\nreplicated W_UV: H x R x Dv = {spec.num_heads} x {spec.kv_lora_rank} x "
          f"{spec.v_head_dim} = {per_layer:,} elements per layer; x {spec.num_layers} layers = "
          f"{per_layer * spec.num_layers * 0.5 / 2**20:,.0f} MiB fp4, "
          f"{per_layer * spec.num_layers * 2 / 2**20:,.0f} MiB bf16 per GPU (latent: 1/N of it)")


def plot(sw: P.Sweep, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"helix": ("Helix", "k", "-"), "tp": ("TP", "C0", "--"), "pp": ("PP", "C1", "--"),
              "ep": ("EP (DP attention)", "C2", "--"), "kvp": ("KVP (Medha-style)", "C3", "--")}
    for kind, (label, color, ls) in styles.items():
        fam = sw.kinds((kind,))
        f = P.pareto(fam)
        if len(f):
            ax.plot(fam.tok_s_user[f], fam.tok_s_gpu[f], ls, color=color, marker=".", label=label,
                    lw=2.2 if kind == "helix" else 1.2, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s/user (1 / TTL)")
    ax.set_ylabel("tokens/s/GPU")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measured_bench(path: Path) -> dict:
    """{(layout, N): {ctx: step ms}} from a bench_layer CSV: the single rank, Helix with the a2a
    exchange and no HOP-B, plain TP. CSVs written before bench_layer had a layout column hold
    only the single rank (KVP 1) and Helix rows."""
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
        raise SystemExit(f"{path} missing: run with --refresh-probe to measure this machine, or "
                         f"--no-calibration")
    return probe.hardware_from_profile(json.loads(path.read_text()))


def calibration(profile: Path, csvs: list[Path], refresh: bool) -> None:
    hw = load_cpu_profile(profile, refresh)
    st0 = Setting(get_model("deepseek-r1"), hw, 8192, "bf16")
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
                st = Setting(st0.model, hw, ctx, "bf16")
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
    ap.add_argument("--mla-exchange", choices=MLA_EXCHANGES, default=DEFAULT_MLA_EXCHANGE,
                    help="what DeepSeek's Helix layouts exchange in the paper sweep (default "
                         "%(default)s)")
    ap.add_argument("--compare-mla-exchange", action="store_true",
                    help="also sweep DeepSeek-R1 with both MLA exchanges and print the difference")
    args = ap.parse_args(argv)
    results, zero_lat, total = {}, {}, 0
    for model, png, title in (("deepseek-r1", "paper_pareto_deepseek_r1.png", "DeepSeek-R1"),
                              ("llama-405b", "paper_pareto_llama405b.png", "Llama-3.1-405B")):
        sw = run_sweep(model, mla_exchange=args.mla_exchange)
        total += sw.evaluated
        results[model] = metrics(sw)
        zero_lat[model] = metrics(run_sweep(model, 0.0, args.mla_exchange))
        plot(sw, f"{title}, 1M context, FP4, GB200 NVL72, <= {MAX_GPUS} GPUs (simulated)", args.out_dir / png)
        _print_best(model, sw)
    print(f"\nswept {total} (layout, batch) configurations per latency setting; wrote PNGs to {args.out_dir}\n")
    print_paper_table(results, zero_lat)
    if args.compare_mla_exchange:
        compare_mla_exchange()
    if not args.no_calibration:
        calibration(args.cpu_profile, args.calibration_csv, args.refresh_probe)
    return 0


def _print_best(model: str, sw: P.Sweep) -> None:
    helix, base = P.split_families(sw)
    for name, fam in (("Helix", helix), ("baseline", base)):
        i = P.choose(fam, None)
        print(f"{model} fastest {name}: {fam.layout(i).label()}, batch {int(fam.batch[i])}, "
              f"TTL {fam.ttl[i] * 1e3:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
