"""serving_compare's outputs: one row per run (client metrics + the per-rank KV columns from
sglang_helix.kv_size), the CSV with '#' metadata lines, the markdown table and the Pareto plot."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serving_budget import PoolInfo
from serving_configs import CONFIGS, ServingCompareError

from sglang_helix.kv_size import max_requests, request_bytes_per_rank

CSV_FIELDS = (
    "config", "context_len", "concurrency", "num_prompts", "output_len",
    "ttft_mean_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms",
    "output_tok_s", "tok_s_user", "kv_bytes_per_request_per_rank", "kv_pool_bytes_per_rank",
    "max_concurrency_in_budget", "duration_s", "accept_len", "peak_rss_mb_per_rank",
)


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
        "kv_bytes_per_request_per_rank": request_bytes_per_rank(
            tokens, pool.page_size, pool.kvp, bytes_per_token),
        "kv_pool_bytes_per_rank": pool.rows_per_rank * bytes_per_token,
        "max_concurrency_in_budget": max_requests(
            pool.pages_per_rank, tokens, pool.page_size, pool.kvp),
    }
    missing = [f for f in CSV_FIELDS if f not in row]
    if missing:
        raise ServingCompareError(f"row misses {missing}")
    return {f: row[f] for f in CSV_FIELDS}


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
