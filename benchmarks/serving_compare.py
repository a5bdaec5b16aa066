"""Serving comparison on CPU ranks: Helix KVP 2 vs plain TP 2, driven by SGLang's own client.

Starts real SGLang 0.5.23 servers on CPU (`sglang_helix.dev.server.launch_server`: free port,
CPU environment, whole-tree kill) with the tiny DeepSeek-V3-style MLA + MoE model
(`ensure_tiny_model("mla", max_positions=...)`: kv_lora_rank 48, rope 8, 3 layers, random
weights, max_position_embeddings raised for long contexts), one server per configuration, all
tp 2 with the same page size and the same per-rank KV budget:

    tp2              plain TP 2, Helix off: every rank holds the whole latent KV (the baseline)
    helix-a2a        --enable-helix --helix-kvp-size 2 --helix-tpa-size 1 --helix-comm-backend a2a
    helix-ag_rs      the same with --helix-comm-backend ag_rs
    helix-a2a-hopb2  helix-a2a with --helix-hopb-slices 2 (HOP-B on; helix-a2a is HOP-B off)
    helix-a2a-ngram  helix-a2a with NGRAM speculative decoding (chain drafts, the flags of
                     tests/e2e/test_serve_spec.py): --speculative-algorithm NGRAM
                     --speculative-num-draft-tokens 4 --speculative-ngram-max-bfs-breadth 1
                     --speculative-ngram-capacity 100000 (GQA and MLA models; not in the
                     default --configs)
    helix-a2a-eagle3 helix-a2a with an EAGLE-3 draft model (chain drafts; --model gqa only):
                     --speculative-algorithm EAGLE3 --speculative-num-steps 3
                     --speculative-eagle-topk 1 --speculative-num-draft-tokens 4
                     --speculative-draft-model-path DRAFT, DRAFT the tiny Llama's own tiny
                     EAGLE-3 draft (`ensure_eagle3_draft`, built on first use; not in the
                     default --configs)

`--model gqa` serves the tiny Llama GQA model instead (8 query heads, 2 KV heads, head dim 16,
4 layers, random weights). Its per-rank KV rows differ between layouts: plain TP 2 keeps one KV
head per rank for every token, Helix KVP 2 x TPA 1 both KV heads for half of the pages, so the
same per-rank bytes hold half as many rows on a Helix rank (the KV columns account for it).

`--prompt-set repetitive`: every prompt is a 3-digit index followed by one shared phrase of 4-8
words repeated to L tokens (distinct first tokens: no radix-cache reuse), so n-gram drafts can hit
even with random weights (on what earlier requests generated after the same text); `random` (the
default) samples 60-160 words per text.

Acceptance length (accept_len, NGRAM and EAGLE-3 configs): tokens committed per verified
request-step in one measured run, from the plugin's /server_info counters
(internal_states[0]["helix"]["spec"], read after a /flush_cache before the run, which restarts
them, and after the run); empty for configs without speculative decoding.

Each server is reused for every context length L and concurrency C; for each (L, C) this runs

    python -m sglang.benchmark.serving --backend sglang --base-url URL --dataset-name random \
        --dataset-path LOCAL.json --tokenize-prompt --random-input-len L --random-output-len OUT \
        --random-range-ratio 1 --num-prompts N --max-concurrency C --warmup-requests 0 \
        --flush-cache --output-details --cache-report --output-file X.jsonl ...

with N = --waves x C. Nothing is downloaded: the "random" dataset samples its token ids from a
ShareGPT-format JSON written locally (text from the tiny tokenizer's corpus, seeded), the tokenizer
is the tiny model's local one, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE are
set. `--tokenize-prompt` sends token ids, so every prompt is exactly L tokens; every prompt is
distinct (no radix-cache reuse across requests) and the cache is flushed before each measured run.

Same per-rank KV budget: every server gets `--max-total-tokens B` (B = --kv-budget-tokens, a
multiple of the page size). Plain TP then holds B latent rows per rank; Helix sizes its pool to
the same per-rank bytes and holds ~KVP x B logical tokens (B rows per rank). Both are checked on
the live servers via GET /server_info (Helix: internal_states[0]["helix"]; plain TP:
max_total_num_tokens) before anything is measured.

Columns: TTFT mean / p99, TPOT p50 / p99, ITL p50 (ms), output tok/s (all requests),
tok/s/user = 1000 / TPOT p50, per-rank KV bytes of one request (plain TP: all its pages on every
rank; Helix: the KVP rank holding the most of its pages, ceil(pages / KVP)), per-rank KV pool bytes,
the largest concurrency whose L + OUT-token contexts fit the per-rank budget, and the peak RSS
of the busier rank process during the run (VmHWM of each sglang::scheduler process, reset through
/proc/<pid>/clear_refs before the run; Linux).

Every failure is an error, never a row: a server that does not start (log tail), a client that
exits non-zero or times out (its log tail), a failed request, a count of completed requests or of
input / output tokens that differs from what was asked, prefix-cache hits in a measured run.
Rows measured before a failure are written next to the CSV as *.partial.csv. All servers and
clients are killed on exit, on error, on Ctrl-C and on SIGTERM.

    python benchmarks/serving_compare.py --quick          # smoke run: L 512, 1024; ~6 min on 2 cores
    python benchmarks/serving_compare.py                  # the run in docs/results.md
    python benchmarks/serving_compare.py --context-lens 4096 16384 65536 --kv-budget-tokens 139264
    python benchmarks/serving_compare.py --model gqa --configs helix-a2a helix-a2a-ngram \
        --prompt-set repetitive --context-lens 1024 --concurrency 1 --waves 4 --output-len 64

Outputs (default docs/results/, --quick: benchmarks/out/): serving_compare.csv (with '#' comment
lines: command, machine, date) and serving_compare.png (per context: tok/s/user vs output tok/s,
one series per config over the concurrencies).

This file is the command line and the run loop; its parts: serving_configs.py (server layouts,
models, prompt sets), serving_budget.py (per-layout KV rows in the budget, the live pool),
serving_client.py (the client command, its JSONL, the local dataset), serving_server.py (warm-up,
speculative counters, acceptance length), serving_report.py (rows, CSV, table, plot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests): find siblings
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_budget import (budget_rows, check_budget, check_pool_matches_budget,  # noqa: E402
                            layout_bytes_per_token, pool_info)
from serving_client import client_argv, parse_result, run_client, write_local_sharegpt  # noqa: E402
from serving_configs import (CONFIGS, DEFAULT_CONFIGS, DTYPES, MODEL_NAMES, MODELS,  # noqa: E402
                             PROMPT_SETS, TP, ServerConfig, ServingCompareError)
from serving_report import format_table, make_row, plot_pareto, write_csv  # noqa: E402
from serving_server import (check_alive, flush_and_count, run_accept_length,  # noqa: E402
                            server_warmup, spec_counts)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "docs" / "results"
QUICK_OUT_DIR = ROOT / "benchmarks" / "out"
STEM = "serving_compare"


# ---------------------------------------------------------------- processes


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every `finally` (server kill) runs."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated(f"signal {signum}")


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS),
                   help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--model", choices=MODELS, default="mla",
                   help="tiny random-weight model: mla (DeepSeek-V3-style, default) or gqa (Llama)")
    p.add_argument("--prompt-set", choices=PROMPT_SETS, default="random",
                   help="random (default) or repetitive: each prompt repeats a short phrase")
    p.add_argument("--context-lens", type=int, nargs="+", default=[4096, 16384],
                   help="prompt lengths L (default: 4096 16384, the run in docs/results.md, "
                        "~14 min on 2 cores; plain TP's CPU prefill of 32K ran out of memory)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    p.add_argument("--waves", type=int, default=1,
                   help="requests per concurrency slot: N = waves x C (default 1, as in "
                        "docs/results.md)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--kv-budget-tokens", type=int, default=40960,
                   help="per-rank KV rows, passed as --max-total-tokens to every server "
                        "(a multiple of --page-size; default 40960)")
    p.add_argument("--chunked-prefill-size", type=int, default=4096)
    p.add_argument("--mem-fraction-static", type=float, default=0.05)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=400.0, help="seconds for a server start")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds for one client run")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"CSV + PNG directory (default {DEFAULT_OUT_DIR.relative_to(ROOT)}, "
                        f"--quick: {QUICK_OUT_DIR.relative_to(ROOT)})")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="server / client logs and JSONL (default: a new temp dir, kept)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: L 512 1024, C 1 2, waves 1, 16 output tokens, budget 4096")
    args = p.parse_args(argv)
    if args.quick:
        args.context_lens, args.concurrency, args.waves = [512, 1024], [1, 2], 1
        args.output_len, args.kv_budget_tokens = 16, 4096
    if args.out_dir is None:
        args.out_dir = QUICK_OUT_DIR if args.quick else DEFAULT_OUT_DIR
    for name in ("context_lens", "concurrency"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.waves < 1 or args.output_len < 2 or args.page_size < 2:
        p.error("--waves >= 1, --output-len >= 2 (for TPOT) and --page-size >= 2 are required")
    args.context_lens = sorted(dict.fromkeys(args.context_lens))
    args.concurrency = sorted(dict.fromkeys(args.concurrency))
    args.configs = list(dict.fromkeys(args.configs))
    eagle3 = [n for n in args.configs if CONFIGS[n].eagle3]
    if eagle3 and args.model != "gqa":
        p.error(f"--configs {' '.join(eagle3)}: the tiny EAGLE-3 drafts are built for the tiny "
                "Llama; add --model gqa")
    # Keep docs/results' main CSV for the default model and prompts; other runs get their own.
    args.stem = STEM if (args.model, args.prompt_set) == ("mla", "random") else (
        f"{STEM}-{args.model}-{args.prompt_set}")
    return args


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {cores} cores, {mem:.0f} GiB, {platform.processor() or platform.machine()}, "
            f"no GPU (the project's 2-core CPU dev VM when run there; shared, timings noisy)")


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start each config's server once, run every (L, C), return the rows."""
    from tqdm import tqdm

    from sglang_helix.dev.server import ProcessesLeftError, RequestError, ServerStartError
    from sglang_helix.dev.tiny_models import ensure_tiny_model

    configs = [CONFIGS[n] for n in args.configs]
    longest = max(args.context_lens) + args.output_len + args.page_size
    max_positions = max(131072, 1 << (longest - 1).bit_length())
    model = ensure_tiny_model(args.model, max_positions=max_positions)
    model_cfg = json.loads((model / "config.json").read_text())
    kvps = sorted({c.kvp for c in configs})
    check_budget(args.kv_budget_tokens, args.page_size, args.context_lens, args.output_len,
                 args.concurrency, kvps,
                 {k: budget_rows(args.kv_budget_tokens, model_cfg, args.dtype, k) for k in kvps})
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="serving_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    dataset = write_local_sharegpt(work / "local_sharegpt.json", seed=args.seed,
                                   prompt_set=args.prompt_set, min_words=max(args.context_lens))
    bpt = {k: layout_bytes_per_token(model_cfg, args.dtype, k) for k in kvps}
    print(f"model {model} (max_position_embeddings {max_positions}), KV B/token/rank by KVP {bpt}; "
          f"logs and JSONL in {work}", file=sys.stderr)
    server_common = [
        "--page-size", str(args.page_size), "--max-total-tokens", str(args.kv_budget_tokens),
        "--mem-fraction-static", str(args.mem_fraction_static), "--dtype", args.dtype,
        "--max-running-requests", str(max(args.concurrency)),
        "--context-length", str(longest), "--chunked-prefill-size", str(args.chunked_prefill_size),
    ]
    rows: list[dict[str, Any]] = []
    total = len(configs) * len(args.context_lens) * len(args.concurrency)
    bar = tqdm(total=total, desc="serving_compare", unit="run", file=sys.stderr)
    try:
        for config in configs:
            bar.set_postfix_str(f"starting {config.name}")
            try:
                _run_config(args, config, model, model_cfg, dataset, work, server_common, bar,
                            rows)
            except (ServerStartError, RequestError, ProcessesLeftError) as exc:
                raise ServingCompareError(f"{config.name}: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        if rows:
            partial = args.out_dir / f"{args.stem}.partial.csv"
            write_csv(partial, rows, {"status": "INCOMPLETE: the run failed or was interrupted",
                                      "command": shlex.join(sys.argv)})
            print(f"\n{len(rows)} rows measured before the failure: {partial}", file=sys.stderr)
        raise
    finally:
        bar.close()
    return rows


def _run_config(args: argparse.Namespace, config: ServerConfig, model: Path,
                model_cfg: Mapping[str, Any], dataset: Path, work: Path,
                server_common: Sequence[str], bar: Any, rows: list[dict[str, Any]]) -> None:
    """One server for `config`: check its pool, warm it up, run every (L, C); rows appended."""
    from sglang_helix.dev.server import (launch_server, peak_rss_bytes, rank_pids, request_json,
                                         reset_peak_rss)

    bpt = layout_bytes_per_token(model_cfg, args.dtype, config.kvp)
    draft = None
    if config.eagle3:
        from sglang_helix.dev.eagle3_training import ensure_eagle3_draft

        draft = ensure_eagle3_draft(model)
    with launch_server(model, [*server_common, *config.server_args(draft)], tp=TP,
                       timeout=args.start_timeout, log_dir=work) as server:
        info_url = server.base_url + "/server_info"
        pool = pool_info(request_json(info_url), config, args.page_size)
        check_pool_matches_budget(
            pool, budget_rows(args.kv_budget_tokens, model_cfg, args.dtype, config.kvp), config.name)
        server_warmup(server.base_url, int(model_cfg["vocab_size"]))
        ranks = rank_pids(server.process.pid)
        if len(ranks) != TP:
            raise ServingCompareError(f"{config.name}: found {len(ranks)} sglang::scheduler "
                                      f"processes, expected {TP} (peak RSS per rank)")
        for length in args.context_lens:
            for conc in args.concurrency:
                bar.set_postfix_str(f"{config.name} L={length} C={conc}")
                n = args.waves * conc
                tag = f"{config.name}-L{length}-C{conc}"
                out_file = work / f"{tag}.jsonl"
                out_file.unlink(missing_ok=True)
                argv = client_argv(server.base_url, model, dataset, out_file,
                                   input_len=length, output_len=args.output_len,
                                   num_prompts=n, concurrency=conc, seed=args.seed)
                try:
                    # SGLang's /flush_cache resets its speculative counters, and the client
                    # flushes again when it starts: read them after our own flush, so the
                    # difference below is this run whether or not the client's flush succeeds.
                    before = (flush_and_count(server.base_url) if config.speculative else None)
                    reset_peak_rss(ranks)
                    run_client(argv, work / f"{tag}.log", args.run_timeout)
                    check_alive(server, config.name)
                    peak = peak_rss_bytes(ranks)
                    metrics = parse_result(out_file, num_prompts=n, input_len=length,
                                           output_len=args.output_len, concurrency=conc)
                    accept = run_accept_length(before, spec_counts(request_json(info_url)),
                                               tag) if config.speculative else None
                except ServingCompareError as exc:
                    raise ServingCompareError(f"{tag}: {exc}\n(server log {server.log_path})") from exc
                rows.append(make_row(config.name, length, conc, n, args.output_len, metrics,
                                     pool, bpt, accept, peak))
                bar.update(1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    started = datetime.now(timezone.utc)
    try:
        with _sigterm_as_exception():
            rows = run(args)
    except ServingCompareError as exc:
        print(f"serving_compare: ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serving_compare: interrupted; servers killed", file=sys.stderr)
        return 130
    wall = time.monotonic() - t0
    meta = {
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "machine": _machine(),
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_s": f"{wall:.0f}",
        "model": MODEL_NAMES[args.model],
        "setup": (f"tp {TP}, page {args.page_size}, per-rank KV budget {args.kv_budget_tokens} rows "
                  f"of plain TP (--max-total-tokens), {args.dtype}, torch_native/helix attention, "
                  f"{args.prompt_set} prompts, output {args.output_len} tokens, N = {args.waves} x C"),
        "tok_s_user": "1000 / TPOT p50; output_tok_s over all requests of the run",
        "accept_len": "NGRAM / EAGLE-3 configs: tokens committed per verified request-step in the run",
    }
    csv_path = write_csv(args.out_dir / f"{args.stem}.csv", rows, meta)
    png_path = plot_pareto(rows, args.out_dir / f"{args.stem}.png",
                           title=f"sglang.benchmark.serving, tiny {args.model.upper()}, tp 2, CPU "
                                 f"ranks ({meta['machine'].split(':')[0]})")
    print(format_table(rows))
    print(f"\nwall {wall:.0f} s; wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
