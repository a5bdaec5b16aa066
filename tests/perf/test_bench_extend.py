"""benchmarks/bench_extend.py runs both tile primitives and they agree (timings not asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_extend_runs_both_paths_and_they_agree(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_extend.py"), "--models", "tiny-mla",
           "tiny-gqa", "--chunk", "70", "--prefix", "0", "200", "--iters", "1", "--dtype", "fp32",
           "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "bench_extend.csv").read_text().splitlines()
    assert lines[0].startswith("# command: ")
    rows = list(csv.DictReader(lines[1:]))
    assert [(r["model"], r["prefix"], r["path"]) for r in rows] == [
        (m, p, path) for m in ("tiny-mla", "tiny-gqa") for p in ("0", "200") for path in ("flash", "matmul")]
    assert all(float(r["max_diff"]) < 1e-5 and float(r["seconds"]) > 0 for r in rows)
    assert "| tiny-mla | 70 | 200 | fp32 | flash |" in (tmp_path / "bench_extend.md").read_text()
