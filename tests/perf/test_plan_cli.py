"""`python -m sglang_helix.plan`: output shape, every printed launch line through the plugin's own
rules, the PNG, one-line exit-2 errors.

Every line the CLI prints is checked here as the plugin checks a launch: its Helix flags and
SGLang settings read off the argv (rules.argv), then rules.check_launch with the model's heads,
experts and the weights the line serves. tests/srt/test_launch_refusals.py parses the same kind
of lines with SGLang's own parser and checks them again."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from sglang_helix import plan as cli
from sglang_helix.perf import probe
from sglang_helix.perf import search as P
from sglang_helix.perf.specs import MODELS, get_model
from sglang_helix.rules import check_launch
from sglang_helix.rules.argv import layout_from_argv, parse_helix_argv
from sglang_helix.rules.kv_cache import HELIX_DEFAULT_PAGE_SIZE
from sglang_helix.rules.model import ModelInfo

from test_perf_model import FAKE_CPU

COLUMNS = ("rank", "family", "layout", "TPOT ms", "tok/s/user", "tok/s/GPU", "max conc", "GB/GPU")


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    """Never measure this machine in tests: the cpu profile is a fixed dict."""
    monkeypatch.setattr(probe, "cpu_profile", lambda refresh=False: dict(FAKE_CPU))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _launch_line(out: str) -> str:
    lines = out.splitlines()
    return lines[lines.index("Launch:") + 1].strip()


def _printed_launch_lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.strip().startswith("python -m sglang.launch_server")]


def _assert_plugin_accepts(model: str, line: str):
    """The line, parsed into the Helix flags and a ServerLayout, passes every launch rule with
    the weights it serves; returns the HelixConfig (None: Helix off)."""
    argv = shlex.split(line)
    spec = get_model(model)
    helix, server = parse_helix_argv(argv), layout_from_argv(argv)
    info = ModelInfo(spec.architecture, spec.num_heads, spec.num_kv_heads, spec.mla, spec.num_experts)
    cfg = check_launch(helix, server, info, P.line_weights(spec, argv))
    assert (cfg is None) == ("--enable-helix" not in argv)
    if cfg is not None:
        assert cfg.world_size == server.tp_size
        assert cfg.page_size == (server.page_size or HELIX_DEFAULT_PAGE_SIZE) >= 2
    return cfg


def test_output_shape(capsys):
    rc, out, _ = _run(capsys, "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware",
                      "gb200", "--batch", "8")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("Helix planner: deepseek-r1") and "objective: lowest TPOT at batch 8" in lines[1]
    header = next(ln for ln in lines if ln.lstrip().startswith("rank"))
    assert all(col in header for col in COLUMNS)
    families = {"Helix", "--dcp-size", "DP attention"}
    assert all(any(f" {fam} " in ln for ln in lines) for fam in families)  # one row per family at least
    assert any(ln.startswith("Helix vs --dcp-size (TPOT): Helix ") for ln in lines)
    assert any(ln.startswith("Winner: ") for ln in lines)
    assert _launch_line(out).startswith("python -m sglang.launch_server --model-path ")


# Models x hardware x objectives; points that fit nowhere exit 2 and print no line.
GRID = [(m, hw, ctx, gpus, goal)
        for m in sorted(MODELS)
        for hw, ctx, gpus in (("gb200", "1M", 64), ("gb300", "256K", 16), ("h200", "128K", 8), ("b200", "64K", 8))
        for goal in (["--batch", "4"], ["--tpot-ms", "30"])]


@pytest.mark.parametrize("model,hw,context,gpus,goal", GRID)
def test_every_printed_launch_line_is_accepted_by_the_plugin(capsys, model, hw, context, gpus, goal):
    rc, out, err = _run(capsys, "--model", model, "--context", context, "--gpus", str(gpus), "--hardware", hw,
                        "--max-batch", "1024", *goal)
    if rc == 2:
        assert "does not fit" in err or "no layout reaches" in err, err
        return
    assert rc == 0
    lines = _printed_launch_lines(out)
    assert lines and lines[0] == _launch_line(out)
    for line in lines:
        _assert_plugin_accepts(model, line)
        assert P.line_weights(get_model(model), shlex.split(line)) is not None, line


def test_fp4_deepseek_helix_is_ranked_at_fp4_weights(capsys):
    """NVFP4 MLA weights pass the rules: Helix is ranked at the requested fp4 weights and its lines
    serve the fp4 checkpoint."""
    rc, out, _ = _run(capsys, "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware", "gb200",
                      "--precision", "fp4", "--batch", "8")
    assert rc == 0
    assert "Refused by sglang_helix" not in out and "(refused at" not in out
    helix_lines = [ln for ln in _printed_launch_lines(out) if "--enable-helix" in ln]
    assert helix_lines and all("--model-path ./DeepSeek-R1-fp4 " in ln for ln in helix_lines)
    for line in helix_lines:
        assert _assert_plugin_accepts("deepseek-r1", line) is not None


def test_fp4_mla_projections_default_to_bf16_as_nvfp4_exports_keep_them(capsys):
    """The header says what the MLA projections were modelled at; bf16 ones (NVIDIA's NVFP4
    exports, the default) make Helix's attention side dearer than the paper's all-fp4 setting."""
    common = ("--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware", "gb200", "--batch", "8")
    rc, bf16, _ = _run(capsys, *common)
    rc4, fp4, _ = _run(capsys, *common, "--fp4-mla-projections", "fp4")
    assert rc == rc4 == 0
    assert "weights fp4 (MLA projections bf16), KV fp8" in bf16 and "(MLA projections fp4)" in fp4
    helix_attention = [float(out.split("\n  Helix ")[1].split()[2]) for out in (bf16, fp4)]
    assert helix_attention[0] > helix_attention[1]
    rc, llama, _ = _run(capsys, "--model", "llama-70b", "--context", "128K", "--gpus", "8", "--hardware", "b200")
    assert rc == 0 and "weights fp4, KV fp8" in llama  # GQA: no MLA projections


def test_helix_is_ranked_at_the_kv_dtype_the_rules_accept(capsys):
    """fp4 (nvfp4) KV pages are refused by the rules: Helix is re-evaluated at fp8 KV and compared
    with --dcp-size at those dtypes too."""
    rc, out, _ = _run(capsys, "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware", "gb200",
                      "--precision", "fp4", "--kv-cache-dtype", "fp4", "--batch", "8")
    assert rc == 0
    assert "Refused by sglang_helix (Helix at fp4 weights / fp4 KV): Helix: --kv-cache-dtype nvfp4" in out
    assert "fp4 weights, fp8 KV (refused at fp4/fp4)" in out
    helix_lines = [ln for ln in _printed_launch_lines(out) if "--enable-helix" in ln]
    assert helix_lines and all("--kv-cache-dtype fp8_e4m3 " in ln for ln in helix_lines)
    assert "at Helix's fp4 weights / fp8 KV:" in out  # Helix against --dcp-size at the same dtypes too


def test_the_winner_gets_its_line_when_it_is_not_helix(capsys):
    rc, out, _ = _run(capsys, "--model", "qwen3.5-397b", "--context", "128K", "--gpus", "16", "--hardware",
                      "gb300", "--tpot-ms", "50")
    assert rc == 0
    assert "Refused by sglang_helix (Helix" in out and "architecture Qwen3_5MoeForConditionalGeneration" in out
    line = _launch_line(out)
    assert "--enable-helix" not in line and _assert_plugin_accepts("qwen3.5-397b", line) is None


def test_plot_writes_a_png(capsys, tmp_path):
    png = tmp_path / "frontiers.png"
    rc, out, _ = _run(capsys, "--model", "llama-70b", "--context", "128K", "--gpus", "8", "--hardware", "h200",
                      "--tpot-ms", "40", "--max-batch", "256", "--plot", str(png))
    assert rc == 0 and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_exchange_dtype_reaches_the_helix_line(capsys):
    rc, out, _ = _run(capsys, "--model", "llama-405b", "--context", "1M", "--gpus", "64", "--hardware", "gb200",
                      "--batch", "16", "--exchange-dtype", "activation")
    assert rc == 0
    helix = [ln for ln in _printed_launch_lines(out) if "--enable-helix" in ln]
    assert helix and all("--helix-exchange-dtype activation" in ln for ln in helix)
    assert all(_assert_plugin_accepts("llama-405b", ln) for ln in helix)


def test_the_planner_imports_neither_srt_nor_sglang_nor_torch():
    code = ("import sys, sglang_helix.plan; "
            "assert not [m for m in sys.modules if m.startswith('sglang_helix.srt')]; "
            "assert 'sglang' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_hardware_uses_cached_probe(capsys):
    # DeepSeek-R1 cannot fit 2 cores' share of RAM: the error proves the cpu profile was used.
    rc, _, err = _run(capsys, "--model", "deepseek-r1", "--context", "64K", "--gpus", "2", "--hardware", "cpu")
    assert rc == 2 and "2 x cpu" in err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "gpt9", "--context", "1M", "--gpus", "8", "--hardware", "gb200"], "choose one of deepseek-r1"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "tpu"], "choose one of gb300"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "0", "--hardware", "h100"], "--gpus 0"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "4096", "--hardware", "h100"], "--gpus 4096"),
    (["--model", "llama-70b", "--context", "100M", "--gpus", "1", "--hardware", "h100"], "does not fit"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--batch", "4",
      "--tpot-ms", "10"], "not allowed with argument"),
    (["--model", "llama-70b", "--context", "lots", "--gpus", "8", "--hardware", "h100"], "context 'lots'"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--precision", "fp4"],
     "no fp4 compute"),
    (["--model", "llama-70b", "--context", "64K", "--gpus", "8", "--hardware", "h100", "--tpot-ms", "0.01"],
     "no layout reaches"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--tpot-ms", "-1"],
     "must be > 0"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "eight", "--hardware", "h100"], "invalid int"),
])
def test_bad_inputs_exit_2_with_one_line(capsys, argv, needle):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err
