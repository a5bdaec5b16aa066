"""scripts/gpu_check.py cannot rot: its CPU dry-run (TRITON_INTERPRET=1, tiny sizes, the GPU
Triton parameter set) runs the same correctness comparisons, bandwidth arithmetic and table as
the GPU run, with "skipped on CPU" rows only for the CUDA-only parts (events, graph capture)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # puts scripts/ on sys.path: its gpu_check_* parts import
    return module


def _rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert lines[0] == "| check | shape | result | figure |"
    return [[c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


@pytest.mark.triton
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = out.read_text()
    assert md.split("\n\n")[0].strip() in done.stdout  # the same table is printed
    rows = _rows(md)
    assert not [r for r in rows if r[2] == "FAIL"]
    by_check = {}
    for check, shape, result, figure in rows:
        by_check.setdefault(check, []).append((shape, result, figure))
    # (a): Triton GQA / MLA (automatic split-KV and 1 split) and the merge, three dtypes each
    for check in ("(a) triton split auto", "(a) triton 1 split"):
        shapes = [s for s, r, _ in by_check[check] if r == "PASS"]
        for dtype in ("bfloat16", "float16", "float32"):
            assert any(s.startswith("GQA") and s.endswith(dtype) for s in shapes), (check, dtype)
            assert any(s.startswith("MLA") and s.endswith(dtype) for s in shapes), (check, dtype)
    assert len([r for _, r, _ in by_check["(a) triton merge"] if r == "PASS"]) == 3
    assert all("max|dout|" in f and "max|dlse|" in f for _, _, f in by_check["(a) triton split auto"])
    # the GPU parameter set ran, and its automatic split-KV split the 300-token rows' capacity
    assert "num_sms=132" in by_check["env TritonConfig"][0][2]
    assert all(f.endswith("(splits 2)") for _, _, f in by_check["(a) triton split auto"])
    # (b): copy bandwidth and the per-shape arithmetic, CUDA events skipped with a row saying so
    assert by_check["copy bandwidth (d2d, read+write)"][0][1] == "INFO (CPU timer)"
    assert by_check["(b) bandwidth timing (CUDA events)"][0][1:] == (
        "SKIP", "skipped on CPU: perf_counter timings below exercise the arithmetic only")
    bw = by_check["(b) bandwidth triton"]
    assert {s.split(" ctx=")[0] for s, _, _ in bw} == {"MLA H=16 R=512+64", "GQA H=16 K=2 D=128"}
    assert all(r == "INFO (CPU timer)" and "% of copy" in f and "GB/s" in f for _, r, f in bw)
    assert any("(splits 4)" in f for _, _, f in bw)
    # (c): graph capture skipped on CPU; the eager plan / re-plan path runs and matches
    assert by_check["(c) CUDA graph capture + replay"][0][1:] == ("SKIP", "skipped on CPU: eager re-plan only")
    replan = by_check["(c) eager re-plan vs fp32 reference"]
    assert {s.split()[0] for s, _, _ in replan} == {"MLA", "GQA"} and all(r == "PASS" for _, r, _ in replan)
    # (e): fp8 pages (e4m3, e5m2) with bf16 queries: decode (2 split settings) and extend prefix
    for check in ("(e) fp8 triton split auto", "(e) fp8 triton 1 split", "(e) fp8 triton extend prefix"):
        shapes = [s for s, r, _ in by_check[check] if r == "PASS"]
        assert len(shapes) == len(by_check[check]) == 4, check
        assert {s.split()[0] for s in shapes} == {"GQA", "MLA"}
        assert {s.split()[-2] for s in shapes} == {"float8_e4m3fn", "float8_e5m2"}
    for lib in ("flashinfer", "sgl-kernel"):
        if importlib.util.find_spec(lib.replace("-", "_")) is None:
            assert by_check[f"env {lib}"][0][2] == "not installed"


def test_a_failing_section_is_a_row_and_the_exit_code(tmp_path, monkeypatch):
    """Every section raises: each becomes a FAIL row with its error text, the others still run,
    the table is still written, and main returns 1."""
    mod = _load()

    def boom(name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"{name} | exploded")
        return fail

    for name in ("copy_bandwidth", "correctness", "bandwidth_section", "graph_section"):
        monkeypatch.setattr(mod, name, boom(name))
    out = tmp_path / "t.md"
    assert mod.main(["--dry-run", "--out", str(out)]) == 1
    rows = _rows(out.read_text())
    fails = {r[0]: r[3] for r in rows if r[2] == "FAIL"}
    assert set(fails) == {"copy bandwidth", "(a) correctness", "(b) bandwidth", "(c) CUDA graph"}
    assert fails["(a) correctness"] == "RuntimeError: correctness | exploded"
    assert "correctness \\| exploded" in out.read_text()  # the cell's pipe is escaped
    assert [r[0] for r in rows[:2]] == ["env device", "env flashinfer"]


def test_bandwidth_arithmetic_and_labels():
    _load()
    import gpu_check_bandwidth as mod
    assert mod.kv_bytes_per_token("mla", 2) == (512 + 64) * 2
    assert mod.kv_bytes_per_token("gqa", 2) == 2 * 8 * 128 * 2  # K and V, 8 KV heads, D=128
    # DeepSeek-V3 MLA, 1M tokens x batch 8 read in 4 ms
    kv = 8 * (1 << 20) * mod.kv_bytes_per_token("mla", 2)
    assert math.isclose(mod.bandwidth(kv, 4.0), kv / 4e-3)
    assert mod.fmt_bw(2.5e12) == "2.500 TB/s" and mod.fmt_bw(2e10) == "20.000 GB/s"
    assert [mod.ctx_label(n) for n in (32 << 10, 1 << 20, 300)] == ["32K", "1M", "300"]


def test_compare_flags_nan_empty_rows_and_tolerance():
    _load()
    import gpu_check_report as mod
    ref_out = torch.zeros(2, 3, 4)
    ref_lse = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, 0.0, 3.0]])
    ok, fig = mod.compare(ref_out.clone(), ref_lse.clone(), ref_out, ref_lse, "bfloat16")
    assert ok and "max|dout| 0.00e+00" in fig
    bad = ref_out.clone()
    bad[1, 1, 0] = 0.1
    assert mod.compare(bad, ref_lse, ref_out, ref_lse, "bfloat16")[1].endswith("out beyond tolerance")
    bad[1, 1, 0] = float("nan")
    assert "NaN in output" in mod.compare(bad, None, ref_out, ref_lse, "float16")[1]
    lse = ref_lse.clone()
    lse[0, 2] = 0.0
    ok, fig = mod.compare(ref_out, lse, ref_out, ref_lse, "float32")
    assert not ok and "-inf rows differ" in fig
    lse = ref_lse + 1e-3
    assert mod.compare(ref_out, lse, ref_out, ref_lse, "float32")[1].endswith("lse beyond tolerance")
