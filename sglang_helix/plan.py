"""`python -m sglang_helix.plan`: Helix or --dcp-size (or plain TP, DP attention) for a model,
context, GPU count and chip, from the analytic model in sglang_helix/perf.

    python -m sglang_helix.plan --model M --context L --gpus N --hardware H \
        [--batch B | --tpot-ms T] [--precision fp4|fp8|bf16] [--kv-cache-dtype fp4|fp8|bf16] \
        [--exchange-dtype fp32|activation] [--collective-latency-us 1] [--plot out.png]

Prints every family's best layouts (Helix KVP x TPA, SGLang --dcp-size, plain TP, DP attention,
PP) ranked at the objective with predicted TPOT, tok/s/user, tok/s/GPU, max concurrency at the
context and memory per GPU; Helix against --dcp-size; and the full `python -m
sglang.launch_server` line of the winner (Helix or not). Every printed line passes the plugin's
own launch rules (sglang_helix.rules, as its resolution hooks run them); a Helix line refused at
the requested dtypes is ranked at the nearest dtypes the rules accept, and the refusal printed.
--gpus is one serving instance (scale out with replicas). Bad inputs: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .perf import search
from .perf.hardware import HARDWARE_CHOICES, get_hardware
from .perf.layouts import LayoutError
from .perf.model import Setting
from .perf.ranking import PLANNER_KINDS, rank
from .perf.report import plot_frontiers, ranking_lines
from .perf.specs import MODEL_ALIASES, MODELS, SpecError, get_model


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
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--batch", type=int, default=None, help="rank by TPOT at this many requests")
    goal.add_argument("--tpot-ms", "--max-ttl-ms", dest="tpot_ms", type=float, default=None,
                      help="rank by tok/s/GPU at TPOT <= this (ms)")
    p.add_argument("--precision", choices=("fp4", "fp8", "bf16"), default=None,
                   help="weights (default: fp4 where the chip has it, else fp8; cpu bf16)")
    p.add_argument("--fp4-mla-projections", choices=("bf16", "fp4"), default="bf16",
                   help="MLA projections at fp4 weights: bf16 as NVIDIA's NVFP4 exports keep them, "
                        "or fp4 (the paper's setting)")
    p.add_argument("--kv-cache-dtype", choices=("fp4", "fp8", "bf16"), default=None,
                   help="KV cache (default: fp8 where the chip has it, else bf16)")
    p.add_argument("--exchange-dtype", choices=("fp32", "activation"), default="fp32",
                   help="Helix --helix-exchange-dtype (default fp32, the plugin's)")
    p.add_argument("--collective-latency-us", type=float, default=1.0,
                   help="seconds per collective step inside the NVLink domain, in us (default 1: the "
                        "model's assumption; beyond the domain 5x this)")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch tried with --tpot-ms")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the per-family frontiers")
    p.add_argument("--refresh-probe", action="store_true", help="re-measure the cpu profile")
    return p


def setting_from(args) -> Setting:
    if MODEL_ALIASES.get(args.model, args.model) not in MODELS:
        raise search.PlannerError(f"--model {args.model!r} unknown; choose one of {', '.join(sorted(MODELS))}")
    if args.hardware not in HARDWARE_CHOICES:
        raise search.PlannerError(
            f"--hardware {args.hardware!r} unknown; choose one of {', '.join(HARDWARE_CHOICES)}")
    if args.hardware == "cpu":  # measured on this machine (cached), not a datasheet spec
        from .perf.probe import cpu_hardware

        hw = cpu_hardware(refresh=args.refresh_probe)
    else:
        hw = get_hardware(args.hardware)
    weights = args.precision or next(p for p in ("fp4", "fp8", "bf16") if p in hw.flops)
    kv = args.kv_cache_dtype or ("fp8" if "fp8" in hw.flops else "bf16")
    if not args.collective_latency_us >= 0:
        raise search.PlannerError(f"--collective-latency-us {args.collective_latency_us:g}: must be >= 0")
    try:
        return Setting(get_model(args.model), hw, search.parse_context(args.context), weights, kv,
                       args.exchange_dtype, args.collective_latency_us / (hw.link_latency * 1e6),
                       fp4_mla_projections=args.fp4_mla_projections)
    except SpecError as exc:
        raise search.PlannerError(f"--precision {weights}: {exc}") from None


def objective(args) -> tuple[int | None, float | None]:
    if args.batch is not None and args.batch < 1:
        raise search.PlannerError(f"--batch {args.batch}: must be >= 1")
    if args.tpot_ms is not None and not args.tpot_ms > 0:
        raise search.PlannerError(f"--tpot-ms {args.tpot_ms:g}: must be > 0")
    return args.batch, None if args.tpot_ms is None else args.tpot_ms / 1e3


def run(args) -> int:
    st = setting_from(args)
    batch, tpot = objective(args)
    if not 1 <= args.gpus <= search.MAX_GPUS:
        raise search.PlannerError(f"--gpus {args.gpus}: give 1..{search.MAX_GPUS} GPUs per instance")
    batches = search.batch_grid(args.max_batch)
    ranking = rank(st, args.gpus, batches, batch, tpot)
    if not ranking.rows:
        raise search.PlannerError(_nothing_message(st, args.gpus, batch, tpot))
    print("\n".join(ranking_lines(st, args.gpus, ranking)))
    if args.plot is not None:
        plot_frontiers(st, args.gpus, batches, PLANNER_KINDS, args.plot,
                       f"{st.model.name}, {st.context // 1024}K context, {args.gpus} x {st.hw.name} (model)")
        print(f"wrote {args.plot}")
    return 0


def _nothing_message(st: Setting, gpus: int, batch: int | None, tpot: float | None) -> str:
    if tpot is not None:
        return (f"no layout reaches TPOT <= {tpot * 1e3:g} ms for {st.model.name} at {st.context} tokens on "
                f"{gpus} x {st.hw.name}: relax --tpot-ms or add GPUs")
    return (f"context {st.context} does not fit {st.model.name} on {gpus} x {st.hw.name} at batch {batch or 1} "
            f"({st.weights} weights, {st.kv} KV); use more GPUs, lower precision or a shorter context")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (search.PlannerError, SpecError, LayoutError) as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
