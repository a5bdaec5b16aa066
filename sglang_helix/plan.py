"""`python -m sglang_helix.plan`: pick a Helix (or baseline) decode layout from the analytic model.

    python -m sglang_helix.plan --model deepseek-r1 --context 1M --gpus 64 --hardware gb200 \
        [--max-ttl-ms X | --min-tokens-per-s-per-user Y] [--precision fp4|fp8|bf16] [--batch 1 8 64]

Prints the Pareto frontier (tok/s/user vs tok/s/GPU) of Helix next to the best baseline
(TP, PP, EP with DP attention, Medha-style KVP), the chosen point and its SGLang launch line.
Every launch line is checked with the plugin's own launch rules (sglang_helix.rules.check_launch,
the function the plugin's resolution hooks call): a line the plugin would refuse is never
printed; the planner says why and prints the nearest line the plugin accepts (the same layout
with wider weights, else another layout).
--gpus is the size of one serving instance (scale out with replicas). Numbers come from the
roofline in sglang_helix/perf/model.py, not from a measurement. Bad inputs: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .perf import search
from .perf.layouts import LayoutError
from .perf.model import Setting
from .perf.specs import HARDWARE_CHOICES, MODEL_ALIASES, MODELS, SpecError, get_hardware, get_model


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"plan: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sglang_helix.plan", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of {', '.join(sorted(MODELS))}")
    p.add_argument("--context", required=True, help="KV history per request: 65536, 64K, 1M")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of one serving instance")
    p.add_argument("--hardware", required=True, help=f"one of {', '.join(HARDWARE_CHOICES)}")
    p.add_argument("--precision", choices=("fp4", "fp8", "bf16"), default=None,
                   help="weights and KV precision (default: fp4 where supported, else fp8; cpu bf16)")
    p.add_argument("--max-ttl-ms", type=float, default=None, help="token-to-token latency budget")
    p.add_argument("--min-tokens-per-s-per-user", type=float, default=None, help="interactivity floor")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes to consider")
    p.add_argument("--rows", type=int, default=12, help="frontier rows to print")
    p.add_argument("--refresh-probe", action="store_true", help="re-measure the cpu profile")
    return p


def min_user_constraint(args) -> float | None:
    """tok/s/user floor from --max-ttl-ms or --min-tokens-per-s-per-user (never both)."""
    ttl, user = args.max_ttl_ms, args.min_tokens_per_s_per_user
    if ttl is not None and user is not None:
        raise search.PlannerError(
            f"conflicting constraints: --max-ttl-ms {ttl:g} and --min-tokens-per-s-per-user {user:g} "
            "both bound latency (tok/s/user = 1000 / TTL ms); give only one"
        )
    for flag, value in (("--max-ttl-ms", ttl), ("--min-tokens-per-s-per-user", user)):
        if value is not None and not value > 0:
            raise search.PlannerError(f"{flag} {value:g}: must be > 0")
    if ttl is not None:
        return 1000.0 / ttl
    return user


def setting_from(args) -> Setting:
    model_name = MODEL_ALIASES.get(args.model, args.model)
    if model_name not in MODELS:
        raise search.PlannerError(
            f"--model {args.model!r} unknown; choose one of {', '.join(sorted(MODELS))}")
    if args.hardware not in HARDWARE_CHOICES:
        raise search.PlannerError(
            f"--hardware {args.hardware!r} unknown; choose one of {', '.join(HARDWARE_CHOICES)}")
    if args.hardware == "cpu":  # measured on this machine (cached), not a datasheet spec
        from .perf.probe import cpu_hardware

        hw = cpu_hardware(refresh=args.refresh_probe)
    else:
        hw = get_hardware(args.hardware)
    precision = args.precision or ("fp4" if "fp4" in hw.flops else "fp8" if "fp8" in hw.flops else "bf16")
    try:
        return Setting(get_model(model_name), hw, search.parse_context(args.context), precision)
    except SpecError as exc:
        raise search.PlannerError(f"--precision {precision}: {exc}") from None


def run(args) -> int:
    st = setting_from(args)
    min_user = min_user_constraint(args)
    batches = sorted(set(args.batch)) if args.batch else search.batch_grid()
    if batches[0] < 1:
        raise search.PlannerError(f"--batch {batches[0]}: batch sizes must be >= 1")
    t0 = time.perf_counter()
    sw = search.sweep_for_gpus(st, args.gpus, batches)
    secs = time.perf_counter() - t0
    if not len(sw.ttl):
        raise search.PlannerError(_no_fit_message(st, args.gpus, sw))
    pick = search.choose(sw, min_user)
    if pick is None:
        raise search.PlannerError(_unreachable_message(sw, min_user))
    _print_header(st, args.gpus, sw, secs)
    helix, base = search.split_families(sw)
    _print_frontiers(helix, base, args.rows)
    return _print_choice(st, sw, pick, helix, base, min_user, batches)


def _unreachable_message(sw: search.Sweep, min_user: float) -> str:
    fastest = search.choose(sw, None)
    return (
        f"no layout reaches {min_user:.1f} tok/s/user (TTL <= {1000 / min_user:.3f} ms); the fastest is "
        f"{sw.tok_s_user[fastest]:.1f} tok/s/user ({sw.layout(fastest).label()}, batch {int(sw.batch[fastest])}); "
        "relax the constraint or add GPUs"
    )


def _no_fit_message(st: Setting, gpus: int, sw: search.Sweep) -> str:
    return (
        f"context {st.context} does not fit {st.model.name} on {gpus} x {st.hw.name} at {st.precision}: "
        f"even batch 1 needs {sw.mem_need / 1e9:.1f} GB per GPU (best layout) > "
        f"{st.hw.usable_memory / 1e9:.1f} GB usable; use more GPUs, a lower precision or a shorter context"
    )


def _print_header(st: Setting, gpus: int, sw: search.Sweep, secs: float) -> None:
    print(f"Helix planner: {st.model.name} ({st.model.hf_id}), context {st.context} tokens, "
          f"{gpus} x {st.hw.name} ({st.hw.source}), {st.precision}")
    print(f"swept {sw.evaluated} (layout, batch) configs, {len(sw.ttl)} fit in memory, in {secs:.2f} s; "
          "analytic roofline (sglang_helix/perf/model.py), not a measurement")
    print()


def _fmt_point(sw: search.Sweep, i: int | None) -> str:
    if i is None:
        return f"{'-':>10} {'':>5} {'':<36}"
    return f"{sw.tok_s_gpu[i]:>10.2f} {int(sw.batch[i]):>5} {sw.layout(i).label():<36}"


def _print_frontiers(helix: search.Sweep, base: search.Sweep, rows: int) -> None:
    fh, fb = search.pareto(helix), search.pareto(base)
    levels = np.unique(np.concatenate([helix.tok_s_user[fh], base.tok_s_user[fb]]))[::-1]
    if len(levels) > rows:
        levels = levels[np.unique(np.linspace(0, len(levels) - 1, rows).round().astype(int))]
    print("Pareto frontier: best tok/s/GPU at tok/s/user >= level (Helix | best of TP/PP/EP/KVP)")
    print(f"{'tok/s/user':>10} {'TTL ms':>7} | {'Helix':>10} {'B':>5} {'layout':<36} | "
          f"{'baseline':>10} {'B':>5} {'layout':<36} | {'ratio':>6}")
    for level in levels:
        ih, ib = _best_at(helix, fh, level), _best_at(base, fb, level)
        ratio = (f"{helix.tok_s_gpu[ih] / base.tok_s_gpu[ib]:>6.2f}" if ih is not None and ib is not None
                 else f"{'-':>6}")
        print(f"{level:>10.1f} {1000 / level:>7.3f} | {_fmt_point(helix, ih)} | {_fmt_point(base, ib)} | {ratio}")
    print()


def _best_at(sw: search.Sweep, frontier: np.ndarray, level: float) -> int | None:
    ok = frontier[sw.tok_s_user[frontier] >= level * (1 - 1e-9)]
    return None if not len(ok) else int(ok[np.argmax(sw.tok_s_gpu[ok])])


def _print_choice(st: Setting, sw: search.Sweep, pick: int, helix: search.Sweep, base: search.Sweep,
                  min_user: float | None, batches) -> int:
    goal = ("lowest latency" if min_user is None
            else f"most tok/s/GPU at >= {min_user:.1f} tok/s/user (TTL <= {1000 / min_user:.3f} ms)")
    print(f"Objective: {goal}")
    for name, fam in (("Helix", helix), ("best baseline", base)):
        i = search.choose(fam, min_user)
        print(f"  {name:<14}: " + ("none meets it" if i is None else _describe(fam, i)))
    print(f"Chosen: {_describe(sw, pick)}")
    ln = search.launch(st, sw.layout(pick), int(sw.batch[pick]))
    reason = search.refusal(st, sw, pick)
    if reason is not None:
        print(f"Refused by sglang_helix: {reason}")
        alt = search.nearest_accepted(st, sw, pick, batches, min_user)
        if alt is None:
            print("No launch line that sglang_helix accepts fits in memory; add GPUs or shorten the context")
            return 0
        print(f"Nearest accepted ({alt.what}): {_describe(alt.sweep, alt.index)}")
        other = search.best_accepted(st, sw, min_user) if alt.setting != st else None
        if other is not None:  # for comparison: what the requested precision gets without Helix
            print(f"  (best accepted at {st.precision}: {_describe(other.sweep, other.index)})")
        ln = alt.launch
    print("Launch:")
    print("  " + (ln.line if ln.argv else ln.note))
    if ln.argv and ln.note:
        print(f"  # {ln.note}")
    return 0


def _describe(sw: search.Sweep, i: int) -> str:
    return (f"{sw.layout(i).label()}, batch {int(sw.batch[i])}: TTL {sw.ttl[i] * 1e3:.3f} ms, "
            f"{sw.tok_s_user[i]:.1f} tok/s/user, {sw.tok_s_gpu[i]:.2f} tok/s/GPU")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (search.PlannerError, SpecError, LayoutError) as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
