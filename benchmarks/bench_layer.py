"""Single-layer Helix decode benchmark on CPU ranks (gloo), in the spirit of TensorRT-LLM's.

One rank = one core (torch threads = 1 per rank), the CPU analogue of one GPU. Three layouts of
the same attention layer:

- "1 rank": the whole layer's attention on one rank (Helix KVP=1, TPA=1: no exchange; the
  trivial one-partial merge is timed as "merge").
- "helix": KVP x TPA = N ranks; the KV is split by page over the KVP ranks (and by KV head over
  TPA), each rank runs partial attention over its pages, then one exchange + LSE merge.
- "tp": plain tensor parallelism on the same N ranks (what SGLang does without Helix): the query
  heads are split N ways and each rank attends its H/N heads over the FULL sequence, no
  exchange. GQA: each rank holds K/N KV heads, or one replicated KV head when N > K (needs
  K % N == 0 or N % K == 0). MLA: the latent (R + Dr per token) is replicated on every rank.
  SGLang then all-reduces after o_proj; that all-reduce is outside the attention layer and is
  not timed here (Helix has an o_proj all-reduce too, after its exchange).

    python benchmarks/bench_layer.py --model deepseek-v3 --ctx-len-start 8192 --ctx-len-end 131072 \
        --kvp 1 2 --backend a2a ag_rs

Every Helix size N = KVP x TPA > 1 also runs plain TP N (--no-plain-tp skips it). Prints a table
(layout, ranks N, context, partial-attention ms, exchange ms, merge ms, step ms, exchange bytes
sent per rank per step, KV bytes read per rank per step, projected TPOT = step x layers) and
writes CSV + Markdown + PNG into --out-dir. "KV bytes/rank" is the KV cache one rank reads in
one decode step of one layer for the whole batch (tokens it attends x its KV heads x
(D + Dv), or x (R + Dr) for MLA, x itemsize): Helix divides the tokens by KVP, plain TP divides
the KV heads by N (GQA, N <= K) or nothing (MLA; GQA with N > K replicates a head).
Times are medians over --iters steps; attention and step take the slowest rank, exchange the
fastest (the rank arriving last at the collective waits only for the communication itself).
With HOP-B slices > 1 the phases interleave, so only the step time is reported. "x-only" is one
exchange + merge timed alone after a barrier (no attention skew), slowest rank.

MLA exchange (--mla-exchange latent value, MLA models only; docs/math.md section 4): every row
then also runs W_UV ([R] -> [v_head_dim] per head, bf16 weights like the activations), timed as
"W_UV ms" and included in the step: "latent" Helix rows exchange the R-wide latent and apply
W_UV to their H/N merged heads after the merge; "value" rows apply W_UV of all H heads to the
rank's partial before the exchange, which then moves v_head_dim per head. The 1 rank and plain
TP rows apply W_UV to the heads they output (H, H/N) after attention (column "latent"). Without
the flag no W_UV runs and the column reads "-".

    python benchmarks/bench_layer.py --model deepseek-v3 --kvp 2 --mla-exchange latent value \
        --ctx-len-start 8192 --ctx-len-end 32768 --backend a2a --hopb-slices 1 2 --batch 1

KV cache dtype (--kv-dtype fp8, i.e. fp8_e4m3, or fp8_e5m2; "auto" = --dtype): every layout runs
once per KV dtype, the pages stored in it (fp8: SGLang's convention, scale 1) and read by the same
kernels (fp8 tiles upcast inside them); queries stay in --dtype, partials in --exchange-dtype. The
--dtype rows are always run as the baseline. Extra columns: the KV dtype, "KV vs <dtype>" = this
row's KV bytes read per rank over the same row's with KV in --dtype (fp8: 0.50), and in the CSV
kv_cache_bytes_per_rank = bytes of the cache tensors the rank really holds (numel x itemsize).

    python benchmarks/bench_layer.py --model deepseek-v3 --kvp 1 2 --kv-dtype fp8 \
        --ctx-len-start 8192 --ctx-len-end 32768 --backend a2a

This file is the command line and the layouts; bench_layer_ranks.py is the work on each rank,
bench_layer_report.py the rows, tables, CSV and plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer_ranks import DTYPES, HELIX, KV_DTYPES, PLAIN_TP, SINGLE, rank_worker  # noqa: E402
from bench_layer_report import Row, print_table, set_kv_ratios, write_outputs  # noqa: E402
from models import MODELS, AttentionSpec  # noqa: E402

from sglang_helix import HelixConfig  # noqa: E402
from sglang_helix.config import DEFAULT_EXCHANGE_DTYPE, EXCHANGE_DTYPES  # noqa: E402
from sglang_helix.ranks import run_ranks  # noqa: E402

KV_ALIASES = {"fp8": "fp8_e4m3"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="deepseek-v3")
    p.add_argument("--ctx-len-start", type=int, default=8192)
    p.add_argument("--ctx-len-end", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kvp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tpa", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["a2a", "ag_rs"], choices=["a2a", "ag_rs"])
    p.add_argument("--hopb-slices", type=int, nargs="+", default=[1])
    p.add_argument("--plain-tp", action=argparse.BooleanOptionalAction, default=True,
                   help="also run plain TP on N = KVP x TPA ranks for every Helix N > 1 (default on)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for one group of ranks")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--mla-exchange", nargs="+", choices=["latent", "value"], default=None,
                   help="MLA only: time W_UV too and run every Helix layout with each exchange "
                        "(module doc)")
    p.add_argument("--exchange-dtype", choices=list(EXCHANGE_DTYPES), default=DEFAULT_EXCHANGE_DTYPE,
                   help="dtype of the exchanged partials, as --helix-exchange-dtype (fp32: 4 bytes "
                        "per element; activation: --dtype)")
    p.add_argument("--kv-dtype", nargs="+", default=None,
                   choices=["auto", *KV_ALIASES, *KV_DTYPES],
                   help="KV cache dtypes to run every layout with (fp8 = fp8_e4m3; auto = --dtype, "
                        "always run as the baseline when any is given; module doc)")
    args = p.parse_args(argv)
    args.kv_dtypes = kv_dtype_names(args.kv_dtype, args.dtype)
    if args.ctx_len_start < 1 or args.ctx_len_end < args.ctx_len_start:
        p.error("--ctx-len-start must be >= 1 and <= --ctx-len-end")
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be >= 1")
    spec = MODELS[args.model]
    if args.mla_exchange and not spec.mla:
        p.error(f"--mla-exchange applies to MLA models; {args.model} is GQA")
    for n in plain_tp_sizes(args):
        why = plain_tp_problem(spec, n)
        if why:
            p.error(f"plain TP {n} for {args.model}: {why} (pass --no-plain-tp to skip it)")
    return args


def kv_dtype_names(requested, dtype: str) -> list[str]:
    """KV dtypes to run: ["-"] (the activation dtype, no KV columns) without --kv-dtype; else
    --dtype first (the baseline), then the others as given, each once."""
    if not requested:
        return ["-"]
    names = [dtype] + [dtype if n == "auto" else KV_ALIASES.get(n, n) for n in requested]
    return list(dict.fromkeys(names))


def ctx_lens(start: int, end: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= end:
        out.append(out[-1] * 2)
    return out


def plain_tp_sizes(args) -> list[int]:
    """TP sizes of the plain-TP baseline: every Helix N = KVP x TPA > 1, once each."""
    if not args.plain_tp:
        return []
    return sorted({k * args.tpa for k in args.kvp if k * args.tpa > 1})


def plain_tp_problem(spec: AttentionSpec, n: int) -> str:
    """Why plain TP n cannot shard `spec`'s heads ("" if it can)."""
    if spec.num_heads % n:
        return f"{spec.num_heads} query heads are not divisible by {n}"
    k = spec.num_kv_heads
    if not spec.mla and k % n and n % k:
        return f"{k} KV heads neither divide nor are divisible by {n}"
    return ""


def run_layout(args, layout: str, kvp: int, tpa: int, kv_dtype: str = "-") -> list[Row]:
    """All contexts of one layout: Helix KVP x TPA (layout "1 rank" when both are 1) or plain
    TP on tpa ranks (kvp 1); kv_dtype: the pages' dtype name ("-": --dtype, no KV columns)."""
    spec = MODELS[args.model]
    world = kvp * tpa
    exchanging = layout == HELIX
    backends = args.backend if exchanging else ["a2a"]  # no exchange to compare
    slices = args.hopb_slices if exchanging else [1]
    modes = args.mla_exchange if exchanging and args.mla_exchange else (
        ["latent"] if args.mla_exchange else ["-"])
    label = {SINGLE: "1 rank", HELIX: f"Helix KVP={kvp} TPA={tpa}", PLAIN_TP: f"plain TP {tpa}"}[layout]
    label += f" KV {kv_dtype}" if kv_dtype != "-" else ""
    opts = dict(model=args.model, layout=layout, label=label, kvp=kvp, tpa=tpa, batch=args.batch, kv_dtype=kv_dtype,
                page_size=args.page_size, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
                ctx_lens=ctx_lens(args.ctx_len_start, args.ctx_len_end), backends=backends, slices=slices,
                modes=modes, exchange_dtype=args.exchange_dtype)
    per_rank = run_ranks(rank_worker, world, args=(opts,), timeout=args.timeout, threads=args.threads_per_rank)
    rows = []
    for i, case in enumerate(per_rank[0]):
        # The slowest rank sets attention and step time. The rank that reaches the exchange last
        # waits least, so the smallest exchange time across ranks is the communication itself
        # (the others also wait out the attention skew).
        pick = (max, min, max, max, max, max)
        secs = [pick[j](r[i]["seconds"][j] for r in per_rank) for j in range(6)]
        ms = [s * 1e3 for s in secs]
        rows.append(Row(args.model, layout, world, case["ctx_len"], args.batch, kvp, tpa,
                        case["backend"] if exchanging and kvp > 1 else "-", case["hopb_slices"],
                        *ms[:5], max(r[i]["bytes_per_step"] for r in per_rank),
                        max(r[i]["kv_bytes"] for r in per_rank), ms[3] * spec.num_layers,
                        mla_exchange=case["mode"], wuv_ms=ms[5], kv_dtype=kv_dtype,
                        kv_cache_bytes_per_rank=max(r[i]["kv_cache_bytes"] for r in per_rank)))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = MODELS[args.model]
    rows = []
    for kvp in args.kvp:
        HelixConfig(kvp=kvp, tpa=args.tpa, num_heads=spec.num_heads,
                    num_kv_heads=spec.num_kv_heads, mla=spec.mla)  # fail fast
        layout = SINGLE if kvp * args.tpa == 1 else HELIX
        for kv_dtype in args.kv_dtypes:
            rows += run_layout(args, layout, kvp, args.tpa, kv_dtype)
    for n in plain_tp_sizes(args):
        for kv_dtype in args.kv_dtypes:
            rows += run_layout(args, PLAIN_TP, 1, n, kv_dtype)
    set_kv_ratios(rows, args.dtype)
    print_table(rows)
    stem = f"bench_layer_{args.model}_b{args.batch}"
    paths = write_outputs(rows, args.out_dir, stem)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
