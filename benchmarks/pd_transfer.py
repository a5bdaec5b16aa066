"""KV bytes each decode rank receives in a PD deployment: Helix decode (KVP) vs plain TP decode.

Starts real deployments on this machine (sglang_helix.dev.pd: prefill TP 1 -> decode TP N over
mooncake TCP on loopback, sglang-router PD mode), sends prompts of the given lengths, and reads the
prefill's own transfer counters (/server_info `helix_pd`: bytes mooncake was asked to write, per
decode session). Prints one table and writes a CSV.

    python benchmarks/pd_transfer.py --model-kind mla --lengths 256 1000 --out docs/results/pd_transfer.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

from sglang_helix.srt.pd import SERVER_INFO_KEY
from sglang_helix.dev.pd import FAST_FAILURE_ENV, launch_pd, server_state
from sglang_helix.dev.server import generate
from sglang_helix.dev.tiny_models import ensure_tiny_model

PAGE = 16


def layouts(tp: int, kind: str) -> dict[str, list[str]]:
    helix = ["--enable-helix", "--helix-kvp-size", str(tp)]
    if kind != "mla":
        helix += ["--helix-tpa-size", "1"]
    return {f"plain TP {tp}": [], f"Helix KVP {tp}": helix}


def sent(prefill_url: str) -> list[dict]:
    return (server_state(prefill_url, SERVER_INFO_KEY) or {"sent": []})["sent"]


def measure(model: str, name: str, decode_args: list[str], tp: int, lengths: list[int],
            max_total: int) -> list[dict]:
    common = ["--page-size", str(PAGE), "--mem-fraction-static", "0.3",
              "--max-total-tokens", str(max_total)]
    rows = []
    with launch_pd(model, decode_args=decode_args, decode_tp=tp, common_args=common,
                   env=FAST_FAILURE_ENV) as pd:
        for n in lengths:
            before = {e["session"]: e["kv_bytes"] for e in sent(pd.prefill.base_url)}
            prompt = [(7 * i + n) % 300 + 5 for i in range(n)]  # distinct per length: no cache hit
            t0 = time.perf_counter()
            generate(pd.router_url, prompt, max_new_tokens=1)
            seconds = time.perf_counter() - t0
            per_rank = sorted(e["kv_bytes"] - before.get(e["session"], 0)
                              for e in sent(pd.prefill.base_url))
            rows.append({"decode": name, "prompt_tokens": n, "decode_ranks": len(per_rank),
                         "bytes_per_rank_min": per_rank[0], "bytes_per_rank_max": per_rank[-1],
                         "bytes_total": sum(per_rank), "request_s": round(seconds, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-kind", default="mla", choices=["mla", "gqa"])
    ap.add_argument("--tp", type=int, default=2, help="decode TP (= KVP for Helix)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1000])
    ap.add_argument("--out", type=Path, default=Path("docs/results/pd_transfer.csv"))
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.lengths):
        ap.error("--lengths must be positive")
    model = str(ensure_tiny_model(args.model_kind))
    max_total = max(4096, 2 * max(args.lengths) + 64)
    rows = []
    for name, decode_args in layouts(args.tp, args.model_kind).items():
        rows += measure(model, name, decode_args, args.tp, args.lengths, max_total)
    print(f"{'decode':<14}{'prompt':>8}{'ranks':>7}{'bytes/rank min':>16}{'max':>12}{'total':>12}")
    for r in rows:
        print(f"{r['decode']:<14}{r['prompt_tokens']:>8}{r['decode_ranks']:>7}"
              f"{r['bytes_per_rank_min']:>16}{r['bytes_per_rank_max']:>12}{r['bytes_total']:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        f.write(f"# {' '.join(['python', 'benchmarks/pd_transfer.py', *sys.argv[1:]])}; "
                f"{platform.node()} {platform.processor() or platform.machine()}; "
                f"model {args.model_kind} {json.dumps(Path(model).name)}; page size {PAGE}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
