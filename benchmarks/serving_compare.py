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

`--model gqa` serves the tiny Llama GQA model instead (8 query heads, 2 KV heads, head dim 16,
4 layers, random weights). Its per-rank KV rows differ between layouts: plain TP 2 keeps one KV
head per rank for every token, Helix KVP 2 x TPA 1 both KV heads for half of the pages, so the
same per-rank bytes hold half as many rows on a Helix rank (the KV columns account for it).

`--prompt-set repetitive`: every prompt is a 3-digit index followed by one shared phrase of 4-8
words repeated to L tokens (distinct first tokens: no radix-cache reuse), so n-gram drafts can hit
even with random weights (on what earlier requests generated after the same text); `random` (the
default) samples 60-160 words per text.

Acceptance length (accept_len, NGRAM configs): tokens committed per verified request-step in one
measured run, from the plugin's /server_info counters (internal_states[0]["helix"]["spec"], read
after a /flush_cache before the run, which restarts them, and after the run); empty for configs
without speculative decoding.

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
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "docs" / "results"
QUICK_OUT_DIR = ROOT / "benchmarks" / "out"
STEM = "serving_compare"
TP = 2
KVP = 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

CSV_FIELDS = (
    "config", "context_len", "concurrency", "num_prompts", "output_len",
    "ttft_mean_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms",
    "output_tok_s", "tok_s_user", "kv_bytes_per_request_per_rank", "kv_pool_bytes_per_rank",
    "max_concurrency_in_budget", "duration_s", "accept_len", "peak_rss_mb_per_rank",
)
# Keys of sglang.benchmark.serving's --output-file JSON (0.5.23) -> our columns.
METRIC_KEYS = {
    "mean_ttft_ms": "ttft_mean_ms", "p99_ttft_ms": "ttft_p99_ms",
    "median_tpot_ms": "tpot_p50_ms", "p99_tpot_ms": "tpot_p99_ms",
    "median_itl_ms": "itl_p50_ms", "output_throughput": "output_tok_s", "duration": "duration_s",
}


class ServingCompareError(RuntimeError):
    """A benchmark run, a server or a budget check failed (the message says which and why)."""


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class ServerConfig:
    """One server layout: kvp 1 = plain TP (Helix off)."""

    name: str
    kvp: int = 1
    comm: str = "a2a"
    hopb_slices: int = 1
    ngram: bool = False

    @property
    def helix(self) -> bool:
        return self.kvp > 1

    def server_args(self) -> list[str]:
        spec = list(NGRAM_ARGS) if self.ngram else []
        if not self.helix:
            return spec
        return ["--enable-helix", "--helix-kvp-size", str(self.kvp), "--helix-tpa-size", "1",
                "--helix-comm-backend", self.comm, "--helix-hopb-slices", str(self.hopb_slices),
                *spec]


# NGRAM chain drafts as tests/e2e/test_serve_spec.py runs them: Helix verifies chains only
# (breadth 1); SGLang's default corpus capacity (10M) did not fit --mem-fraction-static 0.05.
NGRAM_DRAFT_TOKENS = 4
NGRAM_ARGS = ("--speculative-algorithm", "NGRAM",
              "--speculative-num-draft-tokens", str(NGRAM_DRAFT_TOKENS),
              "--speculative-ngram-max-bfs-breadth", "1", "--speculative-ngram-capacity", "100000")


CONFIGS: dict[str, ServerConfig] = {
    c.name: c for c in (
        ServerConfig("tp2"),
        ServerConfig("helix-a2a", KVP, "a2a", 1),
        ServerConfig("helix-ag_rs", KVP, "ag_rs", 1),
        ServerConfig("helix-a2a-hopb2", KVP, "a2a", 2),
        ServerConfig("helix-a2a-ngram", KVP, "a2a", 1, ngram=True),
    )
}
# The run in docs/results.md (no NGRAM: its drafts need a repetitive prompt set to be accepted).
DEFAULT_CONFIGS = ("tp2", "helix-a2a", "helix-ag_rs", "helix-a2a-hopb2")
MODELS = ("mla", "gqa")
MODEL_NAMES = {
    "mla": "tiny DeepSeek-V3-style MLA+MoE (sglang_helix.dev.tiny_models 'mla', random weights)",
    "gqa": "tiny Llama GQA, 8 heads / 2 KV heads (sglang_helix.dev.tiny_models 'gqa', random weights)",
}
PROMPT_SETS = ("random", "repetitive")


# ---------------------------------------------------------------- KV arithmetic (pure)


def pages(tokens: int, page_size: int) -> int:
    """Pages holding `tokens` tokens."""
    if tokens < 0 or page_size < 1:
        raise ValueError(f"tokens must be >= 0 and page_size >= 1, got {tokens}, {page_size}")
    return -(-tokens // page_size)


def kv_bytes_per_token(model_config: Mapping[str, Any], dtype: str, kvp: int = 1) -> int:
    """Bytes of one KV row (one token, all layers) on a rank that holds it, in the layout of
    `kvp` (1 = plain TP over TP ranks, > 1 = Helix KVP x TPA 1).

    MLA: layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes, any layout (the latent is
    replicated under plain TP). GQA: layers x heads x (head_dim + v_head_dim) x dtype bytes, with
    heads = ceil(K / TP) under plain TP (SGLang's CPU engine pads K up to a multiple of TP) and
    all K under Helix with TPA 1."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    if kvp < 1:
        raise ValueError(f"kvp must be >= 1, got {kvp}")
    layers = int(model_config["num_hidden_layers"])
    if "kv_lora_rank" in model_config:
        dims = int(model_config["kv_lora_rank"]) + int(model_config["qk_rope_head_dim"])
        return layers * dims * DTYPE_BYTES[dtype]
    kv_heads = int(model_config["num_key_value_heads"])
    head_dim = int(model_config.get("head_dim")
                   or int(model_config["hidden_size"]) // int(model_config["num_attention_heads"]))
    heads = kv_heads if kvp > 1 else -(-kv_heads // TP)
    return layers * heads * 2 * head_dim * DTYPE_BYTES[dtype]


def budget_rows(budget_tokens: int, model_config: Mapping[str, Any], dtype: str, kvp: int) -> int:
    """KV rows per rank the layout of `kvp` holds in the per-rank bytes of `budget_tokens` plain-TP
    rows (MLA: the same rows; GQA with TP <= K under Helix TPA 1: rows x ceil(K/TP) / K)."""
    plain = kv_bytes_per_token(model_config, dtype, 1)
    return budget_tokens * plain // kv_bytes_per_token(model_config, dtype, kvp)


def request_pages_per_rank(tokens: int, page_size: int, kvp: int) -> int:
    """Pages of one request on the rank holding the most of them (page j lives on rank j % KVP,
    so rank 0 holds ceil(pages / KVP)); kvp 1 = plain TP: every rank holds all pages."""
    if kvp < 1:
        raise ValueError(f"kvp must be >= 1, got {kvp}")
    return -(-pages(tokens, page_size) // kvp)


def kv_bytes_per_request_per_rank(tokens: int, page_size: int, kvp: int, bytes_per_token: int) -> int:
    """Per-rank KV bytes one request of `tokens` tokens occupies (whole pages, worst rank)."""
    return request_pages_per_rank(tokens, page_size, kvp) * page_size * bytes_per_token


def max_concurrency_in_budget(pool_pages_per_rank: int, tokens: int, page_size: int, kvp: int) -> int:
    """Largest number of concurrent requests of `tokens` tokens (prompt + output) whose pages
    fit a pool of `pool_pages_per_rank` pages on every rank."""
    if pool_pages_per_rank < 0:
        raise ValueError(f"pool_pages_per_rank must be >= 0, got {pool_pages_per_rank}")
    return pool_pages_per_rank // request_pages_per_rank(tokens, page_size, kvp)


def check_budget(budget_tokens: int, page_size: int, context_lens: Sequence[int],
                 output_len: int, concurrency: Sequence[int], kvp_values: Sequence[int],
                 rows_per_rank: Mapping[int, int] | None = None) -> None:
    """Before any server starts: every (L, C) must fit the per-rank budget on every layout
    (`rows_per_rank[kvp]`: that layout's rows in the budget, default `budget_tokens`)."""
    if budget_tokens % page_size:
        raise ServingCompareError(
            f"--kv-budget-tokens {budget_tokens} must be a multiple of --page-size {page_size}")
    for kvp in sorted(set(kvp_values)):
        rows = (rows_per_rank or {}).get(kvp, budget_tokens)
        for length in context_lens:
            fit = max_concurrency_in_budget(rows // page_size, length + output_len, page_size, kvp)
            if fit < max(concurrency):
                need = max(concurrency) * request_pages_per_rank(length + output_len, page_size, kvp)
                raise ServingCompareError(
                    f"{'plain TP' if kvp == 1 else f'Helix KVP {kvp}'}: {max(concurrency)} "
                    f"concurrent requests of {length}+{output_len} tokens need {need * page_size} "
                    f"KV rows per rank, the budget holds {rows} (fits {fit}); raise "
                    f"--kv-budget-tokens to >= {-(-need * page_size * budget_tokens // rows)} "
                    f"or lower --concurrency")


@dataclass(frozen=True)
class PoolInfo:
    """Per-rank KV pool of a live server (from GET /server_info)."""

    pages_per_rank: int
    page_size: int
    kvp: int

    @property
    def rows_per_rank(self) -> int:
        return self.pages_per_rank * self.page_size


def pool_info(server_info: Mapping[str, Any], config: ServerConfig, page_size: int) -> PoolInfo:
    """Per-rank pool of `config`'s server; errors if the server's layout is not the one asked."""
    states = server_info.get("internal_states") or [{}]
    helix = states[0].get("helix")
    if not config.helix:
        if helix is not None:
            raise ServingCompareError(f"{config.name}: Helix state present on a plain TP server")
        rows = int(server_info["max_total_num_tokens"])
        return PoolInfo(rows // page_size, page_size, 1)
    if helix is None:
        raise ServingCompareError(
            f"{config.name}: /server_info has no internal_states[0]['helix'] (Helix not active)")
    lay = helix["layout"]
    asked = {"kvp": config.kvp, "tpa": 1, "comm_backend": config.comm,
             "hopb_slices": config.hopb_slices, "page_size": page_size}
    got = {k: lay[k] for k in asked}
    if got != asked:
        raise ServingCompareError(f"{config.name}: server layout {got} != asked {asked}")
    per_rank = [int(r["total_pages"]) for r in helix["per_kvp_rank"]]
    return PoolInfo(min(per_rank), int(helix["page_size"]), int(lay["kvp"]))


def check_pool_matches_budget(pool: PoolInfo, budget_tokens: int, name: str) -> None:
    """The live per-rank pool must be the budget (`budget_tokens`: rows of this layout, see
    `budget_rows`) to within one page."""
    if abs(pool.rows_per_rank - budget_tokens) > pool.page_size:
        raise ServingCompareError(
            f"{name}: per-rank KV pool holds {pool.rows_per_rank} rows, the budget is "
            f"{budget_tokens}; SGLang sized the pool differently (memory profile?) - raise "
            f"--mem-fraction-static or lower --kv-budget-tokens")


# ---------------------------------------------------------------- client output (pure)


def parse_result(jsonl_path: Path, *, num_prompts: int, input_len: int, output_len: int,
                 concurrency: int) -> dict[str, float]:
    """Metrics of one sglang.benchmark.serving run from its --output-file (last JSON line).

    Raises ServingCompareError for a missing/empty file, failed requests, token counts that differ
    from what was asked, or prefix-cache hits (when the client reports cached tokens).
    """
    try:
        lines = [ln for ln in jsonl_path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise ServingCompareError(f"no client output file {jsonl_path}: {exc}") from exc
    if not lines:
        raise ServingCompareError(f"client output file {jsonl_path} is empty")
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ServingCompareError(f"{jsonl_path}: last line is not JSON: {exc}") from exc
    errors = [e for e in res.get("errors") or [] if e]
    if errors:
        raise ServingCompareError(
            f"{len(errors)} of {num_prompts} requests failed; first error: {errors[0][:2000]}")
    if res.get("completed") != num_prompts:
        raise ServingCompareError(
            f"{res.get('completed')} of {num_prompts} requests completed ({jsonl_path})")
    if res.get("max_concurrency") not in (None, concurrency):
        raise ServingCompareError(f"client ran max_concurrency {res.get('max_concurrency')}, "
                                  f"asked {concurrency}")
    expected = {"total_input_tokens": num_prompts * input_len,
                "total_output_tokens": num_prompts * output_len}
    for key, want in expected.items():
        if res.get(key) != want:
            raise ServingCompareError(f"{key} = {res.get(key)}, expected {want} ({jsonl_path})")
    if "cached_tokens" not in res:
        raise ServingCompareError(f"{jsonl_path}: no per-request cached_tokens (run the client "
                                  f"with --output-details --cache-report)")
    cached = [c for c in res["cached_tokens"] if c]
    if cached:
        raise ServingCompareError(
            f"{len(cached)} requests hit the prefix cache ({sum(cached)} tokens): TTFT would not "
            f"be a full prefill")
    out: dict[str, float] = {}
    for key, col in METRIC_KEYS.items():
        value = res.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ServingCompareError(f"{jsonl_path}: metric {key} = {value!r}")
        out[col] = float(value)
    if output_len > 1 and out["tpot_p50_ms"] <= 0:
        raise ServingCompareError(f"{jsonl_path}: median TPOT is 0 with {output_len} output tokens")
    out["tok_s_user"] = 1000.0 / out["tpot_p50_ms"] if out["tpot_p50_ms"] > 0 else float("nan")
    return out


def spec_counts(server_info: Mapping[str, Any]) -> tuple[int, int] | None:
    """(verify_steps, accept_tokens) of a Helix server's speculative counters in /server_info
    (internal_states[0]["helix"]["spec"]); None when the server runs no speculative decoding."""
    states = server_info.get("internal_states") or [{}]
    spec = (states[0].get("helix") or {}).get("spec")
    if spec is None:
        return None
    return int(spec["verify_steps"]), int(spec["accept_tokens"])


def run_accept_length(before: tuple[int, int] | None, after: tuple[int, int] | None,
                      name: str) -> float:
    """Average acceptance length of one run: tokens committed / request-steps verified between
    two readings of `spec_counts` (errors if the server reported none or verified nothing)."""
    if before is None or after is None:
        raise ServingCompareError(
            f"{name}: /server_info has no internal_states[0]['helix']['spec'] (speculative "
            f"decoding not active, or a plugin without the speculative counters)")
    steps, tokens = after[0] - before[0], after[1] - before[1]
    if steps <= 0 or tokens < steps:
        raise ServingCompareError(
            f"{name}: {steps} verify steps and {tokens} accepted tokens in the run "
            f"(counters {before} -> {after})")
    return tokens / steps


def make_row(config: str, context_len: int, concurrency: int, num_prompts: int, output_len: int,
             metrics: Mapping[str, float], pool: PoolInfo, bytes_per_token: int,
             accept_len: float | None = None, peak_rss: Sequence[int] = ()) -> dict[str, Any]:
    """One CSV row: client metrics + the per-rank KV arithmetic of the live pool (+ the run's
    acceptance length for speculative configs, None otherwise; + the largest peak RSS of the
    rank processes during the run, bytes per rank in `peak_rss`, shown in MB)."""
    tokens = context_len + output_len
    row: dict[str, Any] = {
        "config": config, "context_len": context_len, "concurrency": concurrency,
        "num_prompts": num_prompts, "output_len": output_len, **metrics, "accept_len": accept_len,
        "peak_rss_mb_per_rank": max(peak_rss) / 2**20 if peak_rss else None,
        "kv_bytes_per_request_per_rank": kv_bytes_per_request_per_rank(
            tokens, pool.page_size, pool.kvp, bytes_per_token),
        "kv_pool_bytes_per_rank": pool.rows_per_rank * bytes_per_token,
        "max_concurrency_in_budget": max_concurrency_in_budget(
            pool.pages_per_rank, tokens, pool.page_size, pool.kvp),
    }
    missing = [f for f in CSV_FIELDS if f not in row]
    if missing:
        raise ServingCompareError(f"row misses {missing}")
    return {f: row[f] for f in CSV_FIELDS}


# ---------------------------------------------------------------- CSV / table / plot


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, str]) -> Path:
    """CSV with '#'-prefixed metadata lines (command, machine, ...) before the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {' '.join(str(value).splitlines())}\n")
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by write_csv (metadata lines skipped)."""
    with path.open(newline="") as f:
        return list(csv.DictReader(ln for ln in f if not ln.startswith("#")))


TABLE_COLUMNS = (
    ("config", "config", "{}"), ("L", "context_len", "{}"), ("C", "concurrency", "{}"),
    ("N", "num_prompts", "{}"), ("TTFT mean", "ttft_mean_ms", "{:.0f}"),
    ("TTFT p99", "ttft_p99_ms", "{:.0f}"), ("TPOT p50", "tpot_p50_ms", "{:.1f}"),
    ("TPOT p99", "tpot_p99_ms", "{:.1f}"), ("ITL p50", "itl_p50_ms", "{:.1f}"),
    ("out tok/s", "output_tok_s", "{:.2f}"), ("tok/s/user", "tok_s_user", "{:.2f}"),
    ("KV B/req/rank", "kv_bytes_per_request_per_rank", "{:,}"),
    ("max C in budget", "max_concurrency_in_budget", "{}"), ("accept len", "accept_len", "{:.2f}"),
    ("peak RSS/rank MB", "peak_rss_mb_per_rank", "{:,.0f}"),
)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table (times in ms)."""
    head = "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = []
    for row in rows:
        cells = []
        for _, key, fmt in TABLE_COLUMNS:
            value = row.get(key)
            if value is None or value == "":  # no speculative decoding (or an older CSV)
                cells.append("-")
                continue
            if fmt != "{}" and isinstance(value, str):
                value = float(value) if "." in value or "e" in value else int(value)
            cells.append(fmt.format(value))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Per context length: tok/s/user (x) vs output tok/s (y), one series per config over C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(r["context_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.4), squeeze=False)
    markers = dict(zip(CONFIGS, "osD^v"))
    for ax, length in zip(axes[0], lengths):
        for name in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((int(r["concurrency"]), float(r["tok_s_user"]), float(r["output_tok_s"]))
                         for r in rows if r["config"] == name and int(r["context_len"]) == length)
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=markers.get(name, "x"),
                    label=name)
            for c, x, y in pts:
                ax.annotate(f"C={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"context {length} tokens")
        ax.set_xlabel("tok/s/user (1000 / TPOT p50)")
        ax.set_ylabel("output tok/s (all requests)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- local dataset


def write_local_sharegpt(path: Path, *, n: int = 512, seed: int = 0,
                         prompt_set: str = "random", min_words: int = 0) -> Path:
    """A ShareGPT-format JSON (`conversations`, 2 turns) of seeded random word sequences from the
    tiny tokenizer's corpus: the "random" dataset samples its token ids from it instead of
    downloading ShareGPT. Distinct openings, so prompts share no KV page in the radix cache.

    prompt_set "random": "<i> " + 60-160 random words per text. "repetitive": one seeded phrase of
    4-8 words, shared by every text, repeated to at least `min_words` words after a zero-padded
    index ("007 phrase phrase ..."; the tiny tokenizer gives every 3-digit index 3 tokens), so
    prompts differ in their first tokens only and, cut to L tokens, end at the same point of the
    phrase: n-gram drafts can then hit on what earlier requests generated after the same text."""
    from sglang_helix.dev.tiny_models import CORPUS

    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set {prompt_set!r} not in {PROMPT_SETS}")
    if prompt_set == "repetitive" and n > 1000:
        raise ValueError(f"repetitive prompts use 3-digit indices: n <= 1000, got {n}")
    words = sorted(set(CORPUS.split()))
    rng = random.Random(seed)
    # its own generator: the "random" texts stay those of earlier runs with the same seed
    phrase_rng = random.Random(f"phrase-{seed}")
    phrase = [phrase_rng.choice(words) for _ in range(phrase_rng.randint(4, 8))]
    reps = max(1, -(-max(min_words, 1) // len(phrase)))
    data = []
    for i in range(n):
        if prompt_set == "repetitive":
            text = f"{i:03d} " + " ".join(phrase * reps)
        else:
            text = f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(60, 160)))
        data.append({"id": str(i), "conversations": [
            {"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- processes


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every `finally` (server kill) runs."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated(f"signal {signum}")


def client_argv(base_url: str, model_path: Path, dataset_path: Path, output_file: Path, *,
                input_len: int, output_len: int, num_prompts: int, concurrency: int,
                seed: int) -> list[str]:
    """The `python -m sglang.benchmark.serving ...` command of one measured run."""
    return [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
        "--base-url", base_url, "--model", str(model_path), "--tokenizer", str(model_path),
        "--dataset-name", "random", "--dataset-path", str(dataset_path), "--tokenize-prompt",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--random-range-ratio", "1", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--warmup-requests", "0", "--flush-cache",
        "--output-details", "--cache-report", "--output-file", str(output_file), "--disable-tqdm",
        "--seed", str(seed), "--ready-check-timeout-sec", "60",
    ]


def run_client(argv: Sequence[str], log_path: Path, timeout_s: float) -> None:
    """Run the client in its own session; kill its tree on timeout / error / Ctrl-C."""
    from sglang_helix.dev.server import SCRUBBED_ENV, _die_with_parent, kill_tree, log_tail

    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ServingCompareError(
            f"client timed out after {timeout_s:.0f}s; log {log_path}:\n{log_tail(log_path, 3000)}"
        ) from exc
    finally:
        kill_tree(proc)
    if code != 0:
        raise ServingCompareError(
            f"client exited with code {code}; log {log_path}:\n{log_tail(log_path, 3000)}")


def _server_warmup(base_url: str, vocab: int) -> None:
    """One short request (512-token prompt, 8 tokens) so the first measured run is not the
    server's first real prefill/decode (SGLang's own start-up warm-up is a few tokens)."""
    from sglang_helix.dev.server import generate, output_ids

    rng = random.Random(1234)
    ids = [rng.randrange(16, vocab) for _ in range(512)]
    got = output_ids(generate(base_url, ids, max_new_tokens=8))
    if len(got) != 8:
        raise ServingCompareError(f"warm-up request returned {len(got)} tokens, expected 8")


def _flush_and_count(base_url: str, timeout_s: float = 60.0) -> tuple[int, int] | None:
    """POST /flush_cache until the server takes it, then read its speculative counters (an idle
    flush restarts them at 0). SGLang answers 400 while a request is still in the scheduler,
    which happens for a moment after the previous answer came back (seen after the warm-up)."""
    from sglang_helix.dev.server import request_json

    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(base_url + "/flush_cache", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60):
                break
        except urllib.error.HTTPError as exc:
            if exc.code != 400 or time.monotonic() > deadline:
                raise ServingCompareError(f"/flush_cache answered HTTP {exc.code} "
                                          f"(server not idle after {timeout_s:.0f} s?)") from exc
        time.sleep(0.5)
    return spec_counts(request_json(base_url + "/server_info"))


def _check_alive(server: Any, name: str) -> None:
    if server.process.poll() is not None:
        raise ServingCompareError(
            f"{name}: server exited with code {server.process.returncode}; log "
            f"{server.log_path}:\n{server.log(3000)}")


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
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32")
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
    bpt = {k: kv_bytes_per_token(model_cfg, args.dtype, k) for k in kvps}
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

    bpt = kv_bytes_per_token(model_cfg, args.dtype, config.kvp)
    with launch_server(model, [*server_common, *config.server_args()], tp=TP,
                       timeout=args.start_timeout, log_dir=work) as server:
        info_url = server.base_url + "/server_info"
        pool = pool_info(request_json(info_url), config, args.page_size)
        check_pool_matches_budget(
            pool, budget_rows(args.kv_budget_tokens, model_cfg, args.dtype, config.kvp), config.name)
        _server_warmup(server.base_url, int(model_cfg["vocab_size"]))
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
                    before = (_flush_and_count(server.base_url) if config.ngram else None)
                    reset_peak_rss(ranks)
                    run_client(argv, work / f"{tag}.log", args.run_timeout)
                    _check_alive(server, config.name)
                    peak = peak_rss_bytes(ranks)
                    metrics = parse_result(out_file, num_prompts=n, input_len=length,
                                           output_len=args.output_len, concurrency=conc)
                    accept = run_accept_length(before, spec_counts(request_json(info_url)),
                                               tag) if config.ngram else None
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
        "accept_len": "NGRAM configs: tokens committed per verified request-step in the run",
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
