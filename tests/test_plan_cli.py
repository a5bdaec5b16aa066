"""`python -m sglang_helix.plan`: output, launch line validity, and one-line exit-2 errors."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest

from sglang_helix import plan as cli
from sglang_helix.args import ModelInfo, parse_helix_argv, resolve_helix_args
from sglang_helix.perf import probe
from sglang_helix.perf.specs import get_model

from test_perf_model import FAKE_CPU


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    """Never measure this machine in tests: the cpu profile is a fixed dict."""
    monkeypatch.setattr(probe, "cpu_profile", lambda refresh=False: dict(FAKE_CPU))


def _launch_line(out: str) -> str:
    lines = out.splitlines()
    return lines[lines.index("Launch:") + 1].strip()


def _server_args(argv: list[str]) -> SimpleNamespace:
    def flag(name, default):
        return int(argv[argv.index(name) + 1]) if name in argv else default
    return SimpleNamespace(tp_size=flag("--tp-size", 1), pp_size=flag("--pp-size", 1), device="cuda")


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
    assert line.startswith("python -m sglang.launch_server --model-path " + get_model(model).hf_id)
    argv = shlex.split(line)
    assert "--enable-helix" in argv, line  # 1M context: Helix wins on these models
    assert int(argv[argv.index("--page-size") + 1]) >= 2  # the plugin refuses page size 1
    spec = get_model(model)
    info = ModelInfo(spec.architecture, spec.num_heads, spec.num_kv_heads, spec.mla)
    cfg = resolve_helix_args(parse_helix_argv(argv), _server_args(argv), info)
    assert cfg.world_size == _server_args(argv).tp_size


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
