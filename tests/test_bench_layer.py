"""The single-layer benchmark runs end to end on CPU ranks and reports bytes that match the
exchange formula (timings are not asserted: benchmarks measure, tests prove)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_helix.comm import a2a_bytes_per_rank

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multirank
def test_bench_layer_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--model", "deepseek-v3-lite",
           "--ctx-len-start", "128", "--ctx-len-end", "256", "--batch", "2", "--kvp", "1", "2",
           "--hopb-slices", "1", "2", "--iters", "1", "--warmup", "0", "--page-size", "16",
           "--out-dir", str(tmp_path), "--timeout", "120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / "bench_layer_deepseek-v3-lite_b2"
    for ext in ("csv", "md", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    rows = list(csv.DictReader(stem.with_suffix(".csv").open()))
    # KVP 1: 2 contexts; KVP 2: 2 contexts x 2 backends x 2 HOP-B settings
    assert len(rows) == 2 + 8
    for row in rows:
        expected = 0 if row["kvp"] == "1" else a2a_bytes_per_rank(2, 16, 512, 2, 2)
        if row["backend"] == "ag_rs":  # fp32 all-gather of LSE + fp32 reduce-scatter
            expected = 2 * 16 * 4 * 1 + 2 * 16 * 512 * 4 // 2
        assert int(row["bytes_per_rank"]) == expected, row
        assert float(row["step_ms"]) > 0


def test_bench_layer_rejects_bad_range(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--ctx-len-start", "4096",
           "--ctx-len-end", "1024", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ctx-len-start" in done.stderr
