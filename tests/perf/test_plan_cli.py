"""`python -m sglang_helix.plan`: output, launch line validity, and one-line exit-2 errors.

Every launch line the CLI prints is checked here with the plugin's own whole-launch rules
(sglang_helix.rules.check_launch) on the line as parsed; tests/srt/test_launch_refusals.py parses
the same lines with SGLang's own parser and checks them again."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from sglang_helix import plan as cli
from sglang_helix.perf import probe
from sglang_helix.perf import search as P
from sglang_helix.perf.layouts import Layout
from sglang_helix.perf.model import Setting
from sglang_helix.perf.specs import MODELS, get_hardware, get_model
from sglang_helix.rules import check_launch
from sglang_helix.rules.argv import layout_from_argv, parse_helix_argv
from sglang_helix.rules.kv_cache import HELIX_DEFAULT_PAGE_SIZE
from sglang_helix.rules.model import ModelInfo

from test_perf_model import FAKE_CPU


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    """Never measure this machine in tests: the cpu profile is a fixed dict."""
    monkeypatch.setattr(probe, "cpu_profile", lambda refresh=False: dict(FAKE_CPU))


def _launch_line(out: str) -> str:
    lines = out.splitlines()
    return lines[lines.index("Launch:") + 1].strip()


def _printed_launch_lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.strip().startswith("python -m sglang.launch_server")]


def _model_info(model: str) -> ModelInfo:
    spec = get_model(model)
    return ModelInfo(spec.architecture, spec.num_heads, spec.num_kv_heads, spec.mla, spec.num_experts)


def _assert_plugin_accepts(model: str, line: str):
    """The line, parsed into the Helix flags and a ServerLayout, passes every launch rule
    (check_launch, with the weights the line serves); returns the HelixConfig (None: Helix off)."""
    argv = shlex.split(line)
    helix, server = parse_helix_argv(argv), layout_from_argv(argv)
    cfg = check_launch(helix, server, _model_info(model), P.line_weights(get_model(model), argv))
    assert (cfg is None) == ("--enable-helix" not in argv)
    if cfg is not None:
        assert cfg.world_size == server.tp_size
        assert cfg.page_size == (server.page_size or HELIX_DEFAULT_PAGE_SIZE) >= 2
    return cfg


@pytest.mark.parametrize("model,gpus,extra", [
    ("deepseek-r1", 64, ["--max-ttl-ms", "5"]),
    ("llama-405b", 64, []),
    ("llama-70b", 64, ["--max-ttl-ms", "5", "--precision", "fp8"]),
    ("kimi-k2", 32, ["--batch", "1", "4", "16"]),
])
def test_launch_line_satisfies_helix_config(capsys, model, gpus, extra):
    rc = cli.main(["--model", model, "--context", "1M", "--gpus", str(gpus), "--hardware", "gb200", *extra])
    out = capsys.readouterr().out
    assert rc == 0 and "Pareto frontier" in out and "Helix" in out
    line = _launch_line(out)
    assert line.startswith("python -m sglang.launch_server --model-path ")
    argv = shlex.split(line)
    assert "--enable-helix" in argv, line  # 1M context: Helix wins on these models
    assert "--page-size" not in argv  # the plugin's default (64) applies
    assert _assert_plugin_accepts(model, line) is not None


# Models x hardware x precisions x sizes; points that fit nowhere exit 2 and print no line.
GRID = [(m, hw, prec, ctx, gpus)
        for m in sorted(MODELS)
        for hw, precs in (("gb200", ("fp4", "fp8", "bf16")), ("h200", ("fp8", "bf16")), ("h100", ("fp8",)))
        for prec in precs
        for ctx, gpus in (("1M", 64), ("128K", 8))]


@pytest.mark.parametrize("model,hw,precision,context,gpus", GRID)
def test_every_printed_launch_line_is_accepted_by_the_plugin(capsys, model, hw, precision, context, gpus):
    rc = cli.main(["--model", model, "--context", context, "--gpus", str(gpus), "--hardware", hw,
                   "--precision", precision, "--max-ttl-ms", "20"])
    captured = capsys.readouterr()
    if rc == 2:
        assert "does not fit" in captured.err or "no layout reaches" in captured.err, captured.err
        return
    assert rc == 0
    out = captured.out
    lines = _printed_launch_lines(out)
    assert len(lines) <= 1, out  # a refused line is never printed, only the accepted one
    for line in lines:
        _assert_plugin_accepts(model, line)
        assert P.line_weights(get_model(model), shlex.split(line)) is not None, line
    if "Refused by sglang_helix:" in out:
        assert "Nearest accepted (" in out, out


def test_fp8_deepseek_line_is_accepted(capsys):
    rc = cli.main(["--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware", "gb200",
                   "--precision", "fp8", "--max-ttl-ms", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "Refused by sglang_helix" not in out
    line = _launch_line(out)
    argv = shlex.split(line)
    assert argv[argv.index("--model-path") + 1] == "deepseek-ai/DeepSeek-R1" and "--enable-helix" in argv
    assert _assert_plugin_accepts("deepseek-r1", line) is not None


def test_refused_fp4_deepseek_says_why_and_prints_the_fp8_line(capsys):
    rc = cli.main(["--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--hardware", "gb200",
                   "--precision", "fp4", "--max-ttl-ms", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Refused by sglang_helix: Helix: --enable-helix with fp4 weights (DeepseekV3ForCausalLM)" in out
    assert "Nearest accepted (the same layout with fp8 weights)" in out
    line = _launch_line(out)
    argv = shlex.split(line)
    assert argv[argv.index("--model-path") + 1] == "deepseek-ai/DeepSeek-R1" and "--enable-helix" in argv
    assert _assert_plugin_accepts("deepseek-r1", line) is not None
    assert _printed_launch_lines(out) == [line]  # the refused fp4 line is not printed


def test_unsupported_architecture_gets_an_accepted_baseline(capsys):
    rc = cli.main(["--model", "qwen3-235b", "--context", "1M", "--gpus", "64", "--hardware", "gb200"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Refused by sglang_helix: Helix: --enable-helix: architecture Qwen3MoeForCausalLM" in out
    assert "Nearest accepted (the best accepted layout at fp4)" in out
    line = _launch_line(out)
    assert "--enable-helix" not in line and _assert_plugin_accepts("qwen3-235b", line) is None


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("precision", P.PRECISIONS)
def test_line_weights_inverts_checkpoint(model, precision):
    spec = get_model(model)
    ck = P.checkpoint(spec, precision)
    argv = ["python", "-m", "sglang.launch_server", "--model-path", ck.model_path]
    argv += ["--quantization", ck.quantization] if ck.quantization else []
    assert ck.weights == precision and P.line_weights(spec, argv) == precision
    assert bool(ck.note) == ck.model_path.startswith("./")


def test_helix_lines_name_a_backend_the_plugin_accepts_where_sglangs_default_may_not_be_one():
    cpu = probe.hardware_from_profile(dict(FAKE_CPU))
    cases = [  # (model, hardware, expected --attention-backend, expected --device)
        ("llama-70b", get_hardware("gb200"), "flashinfer", None),  # SGLang's Blackwell GQA default: trtllm_mha
        ("deepseek-r1", get_hardware("gb200"), None, None),  # MLA defaults (fa3/flashinfer/triton) are accepted
        ("llama-70b", cpu, "torch_native", "cpu"),  # SGLang's x86 default intel_amx is refused
    ]
    for model, hw, backend, device in cases:
        st = Setting(get_model(model), hw, 65536, "bf16")
        ln = P.launch(st, Layout("helix", kvp=2, tpa=1, tpf=2), 4)
        layout = layout_from_argv(ln.argv)
        assert (layout.attention_backend, layout.device) == (backend, device), ln.line
        assert P.plugin_refusal(st.model, ln.argv) is None, ln.line
        assert "--page-size" not in ln.argv


def test_the_planner_imports_neither_srt_nor_sglang_nor_torch():
    code = ("import sys, sglang_helix.plan; "
            "assert not [m for m in sys.modules if m.startswith('sglang_helix.srt')]; "
            "assert 'sglang' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_baseline_can_win_and_gets_its_own_launch_line(capsys):
    argv = ["--model", "llama-70b", "--context", "1M", "--gpus", "16", "--hardware", "gb200",
            "--min-tokens-per-s-per-user", "50", "--precision", "fp8"]
    assert cli.main(argv) == 0
    line = _launch_line(capsys.readouterr().out)
    assert "--enable-helix" not in line and "--tp-size 16" in line


def test_cpu_hardware_uses_cached_probe(capsys):
    # DeepSeek-R1 cannot fit 2 cores' share of RAM: the error proves the cpu profile was used.
    rc = cli.main(["--model", "deepseek-r1", "--context", "64K", "--gpus", "2", "--hardware", "cpu"])
    assert rc == 2 and "2 x cpu" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "gpt9", "--context", "1M", "--gpus", "8", "--hardware", "gb200"], "choose one of deepseek-r1"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "tpu"], "choose one of gb200"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "0", "--hardware", "h100"], "--gpus 0"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "4096", "--hardware", "h100"], "--gpus 4096"),
    (["--model", "llama-70b", "--context", "100M", "--gpus", "1", "--hardware", "h100"], "does not fit"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--max-ttl-ms", "5",
      "--min-tokens-per-s-per-user", "10"], "conflicting constraints"),
    (["--model", "llama-70b", "--context", "lots", "--gpus", "8", "--hardware", "h100"], "context 'lots'"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--precision", "fp4"],
     "no fp4 compute"),
    (["--model", "llama-70b", "--context", "64K", "--gpus", "8", "--hardware", "h100",
      "--min-tokens-per-s-per-user", "100000"], "no layout reaches"),
    (["--model", "llama-70b", "--context", "1M", "--gpus", "8", "--hardware", "h100", "--max-ttl-ms", "-1"],
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
