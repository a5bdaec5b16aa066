"""The single-layer benchmark runs end to end on CPU ranks and reports bytes that match the
exchange and KV formulas (timings are not asserted: benchmarks measure, tests prove)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_helix.comm import a2a_bytes_per_rank

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path, model: str, *extra: str) -> list[dict]:
    """Runs bench_layer.py (contexts 128 and 256, batch 2, page 16) and returns its CSV rows."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--model", model,
           "--ctx-len-start", "128", "--ctx-len-end", "256", "--batch", "2", "--iters", "1",
           "--warmup", "0", "--page-size", "16", "--out-dir", str(tmp_path), "--timeout", "120", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / f"bench_layer_{model}_b2"
    for ext in ("csv", "md", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    return list(csv.DictReader(stem.with_suffix(".csv").open()))


@pytest.mark.multirank
def test_bench_layer_smoke(tmp_path):
    rows = run_bench(tmp_path, "deepseek-v3-lite", "--kvp", "1", "2", "--hopb-slices", "1", "2")
    # 1 rank: 2 contexts; Helix KVP 2: 2 contexts x 2 backends x 2 HOP-B settings; plain TP 2: 2
    assert len(rows) == 2 + 8 + 2
    assert [r["layout"] for r in rows] == ["1 rank"] * 2 + ["helix"] * 8 + ["tp"] * 2
    md = (tmp_path / "bench_layer_deepseek-v3-lite_b2.md").read_text()
    assert "| plain TP 2 | 2 |" in md and "| Helix KVP 2 | 2 |" in md and "| 1 rank | 1 |" in md
    itemsize, latent = 2, 512 + 64  # bf16; MLA R + Dr
    for row in rows:
        # partials travel in fp32 (docs/math.md section 4): 4 bytes per element
        expected = 0 if row["layout"] != "helix" else a2a_bytes_per_rank(2, 16, 512, 4, 2)
        if row["backend"] == "ag_rs":  # fp32 all-gather of LSE + fp32 reduce-scatter
            expected = 2 * 16 * 4 * 1 + 2 * 16 * 512 * 4 // 2
        assert int(row["bytes_per_rank"]) == expected, row
        assert float(row["step_ms"]) > 0
        # KV read per rank per step: batch x tokens read x (R + Dr) x itemsize. 128 and 256 are
        # whole numbers of 16-token page pairs, so Helix KVP 2 reads exactly half the tokens;
        # plain TP replicates the latent and reads them all, like the single rank.
        tokens = int(row["ctx_len"]) // (2 if row["layout"] == "helix" else 1)
        assert int(row["kv_bytes_per_rank"]) == 2 * tokens * latent * itemsize, row


@pytest.mark.multirank
def test_bench_layer_plain_tp_gqa(tmp_path):
    """GQA (Llama-70B dims, K = 8): plain TP 2 holds K/2 KV heads over the whole sequence, Helix
    KVP 2 all K heads over half the pages: equal KV bytes per rank (N <= K)."""
    kv_heads, head_dim = 8, 128  # benchmarks/models.py llama-70b
    rows = run_bench(tmp_path, "llama-70b", "--kvp", "1", "2", "--backend", "a2a",
                     "--ctx-len-end", "128")
    assert [r["layout"] for r in rows] == ["1 rank", "helix", "tp"]
    itemsize, n, ctx, batch = 2, 2, 128, 2
    per_token = (head_dim + head_dim) * itemsize  # D + Dv
    by_layout = {r["layout"]: int(r["kv_bytes_per_rank"]) for r in rows}
    assert by_layout["1 rank"] == batch * ctx * kv_heads * per_token
    assert by_layout["tp"] == batch * ctx * (kv_heads // n) * per_token  # L (K/N)(D+Dv)
    assert by_layout["helix"] == batch * (ctx // n) * kv_heads * per_token
    assert int(rows[2]["bytes_per_rank"]) == 0 and rows[2]["tpa"] == "2" and rows[2]["ranks"] == "2"


def test_bench_layer_rejects_bad_range(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--ctx-len-start", "4096",
           "--ctx-len-end", "1024", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ctx-len-start" in done.stderr


@pytest.mark.multirank
def test_bench_layer_mla_exchange_rows(tmp_path):
    """--mla-exchange latent value: each Helix row runs in both modes with W_UV timed; the value
    rows send v_head_dim (128) instead of kv_lora_rank (512) per head; 1 rank / plain TP rows
    apply W_UV after attention ("latent")."""
    rows = run_bench(tmp_path, "deepseek-v3-lite", "--kvp", "1", "2", "--backend", "a2a",
                     "--ctx-len-end", "128", "--mla-exchange", "latent", "value")
    assert [(r["layout"], r["mla_exchange"]) for r in rows] == [
        ("1 rank", "latent"), ("helix", "latent"), ("helix", "value"), ("tp", "latent")]
    sent = {r["mla_exchange"]: int(r["bytes_per_rank"]) for r in rows if r["layout"] == "helix"}
    assert sent == {"latent": a2a_bytes_per_rank(2, 16, 512, 4, 2),
                    "value": a2a_bytes_per_rank(2, 16, 128, 4, 2)}
    assert all(float(r["wuv_ms"]) > 0 for r in rows)
    assert "| MLA exchange | W_UV ms |" in (tmp_path / "bench_layer_deepseek-v3-lite_b2.md").read_text()


@pytest.mark.multirank
def test_bench_layer_fp8_kv_rows(tmp_path):
    """--kv-dtype fp8: every layout runs with bf16 pages (the baseline) and fp8_e4m3 pages; the fp8
    rows read and hold half the KV bytes per rank, and exchange exactly as many bytes (partials
    and LSE travel in fp32 whatever the page dtype)."""
    rows = run_bench(tmp_path, "deepseek-v3-lite", "--kvp", "2", "--backend", "a2a", "--ctx-len-end", "128",
                     "--kv-dtype", "fp8", "--no-plain-tp")
    assert [(r["layout"], r["kv_dtype"]) for r in rows] == [("helix", "bf16"), ("helix", "fp8_e4m3")]
    bf16, fp8 = rows
    assert int(fp8["kv_bytes_per_rank"]) * 2 == int(bf16["kv_bytes_per_rank"]) == 2 * 64 * (512 + 64) * 2
    assert int(fp8["kv_cache_bytes_per_rank"]) * 2 == int(bf16["kv_cache_bytes_per_rank"])
    assert (float(fp8["kv_ratio"]), float(bf16["kv_ratio"])) == (0.5, 1.0)
    assert fp8["bytes_per_rank"] == bf16["bytes_per_rank"] == str(a2a_bytes_per_rank(2, 16, 512, 4, 2))
    assert "| KV dtype | KV bytes vs bf16 |" in (tmp_path / "bench_layer_deepseek-v3-lite_b2.md").read_text()


@pytest.mark.multirank
def test_bench_layer_exchange_dtype_activation(tmp_path):
    """--exchange-dtype activation: bf16 partials on the wire, 2 bytes per element (the fp32
    default sends 4: test_bench_layer_smoke); ag_rs reduce-scatters fp32 either way."""
    rows = run_bench(tmp_path, "deepseek-v3-lite", "--kvp", "2", "--ctx-len-end", "128",
                     "--exchange-dtype", "activation", "--no-plain-tp")
    sent = {r["backend"]: int(r["bytes_per_rank"]) for r in rows}
    assert sent == {"a2a": a2a_bytes_per_rank(2, 16, 512, 2, 2),
                    "ag_rs": 2 * 16 * 4 * 1 + 2 * 16 * 512 * 4 // 2}
