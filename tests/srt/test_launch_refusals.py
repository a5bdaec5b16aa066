"""Helix launch refusals inside the installed SGLang 0.5.23 (CPU engine), batched.

One fresh interpreter (`RESOLVE_SCRIPT`) registers the plugin, applies its hooks and, for each
case, runs SGLang's own `prepare_server_args` (SGLang's parser with the Helix group) and argument
resolution (`resolve_once`: the plugin's early and late hooks, no rank started, no weight
loaded); it reports each refusal's exception and message, or what resolved. The same interpreter
parses every launch line the planner prints with SGLang's parser, so the lines are checked here
with the plugin's own path: SGLang's parser -> ServerLayout -> rules.check_launch. One real
`python -m sglang.launch_server` run proves a refusal reaches the user with a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from helpers import NEEDS_SGLANG
from sglang_helix import plan as cli
from sglang_helix.perf import search
from sglang_helix.perf.specs import get_model
from sglang_helix.rules import check_launch
from sglang_helix.rules.argv import layout_from_argv, parse_helix_argv
from sglang_helix.rules.flags import HelixServerArgs
from sglang_helix.rules.model import ModelInfo
from sglang_helix.rules.server import SGLANG_FLAGS, ServerLayout

pytestmark = NEEDS_SGLANG

TIMEOUT_S = 300
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "torch_dtype": "float32", "rope_theta": 10000.0,
}
CPU_HELIX = ["--device", "cpu", "--attention-backend", "torch_native", "--tp-size", "2", "--enable-helix"]

# (id, flags after --model-path, texts the refusal must contain). "early": refused by the flags-only
# stage, before SGLang reads the model's config (the model directory has no config.json).
REFUSALS = [
    ("tpa-above-kv-heads", ["--device", "cpu", "--attention-backend", "torch_native", "--tp-size", "4",
                            "--enable-helix", "--helix-tpa-size", "4"],
     ["--helix-tpa-size 4 > the model's 2 KV heads", "use --helix-tpa-size <= 2"]),
    ("page-size-1", CPU_HELIX + ["--page-size", "1"], ["Helix: --page-size 1", "use --page-size 16"]),
    # (not intel_amx: SGLang resolves it to torch_native on a CPU without AMX)
    ("flex-attention", ["--device", "cpu", "--attention-backend", "flex_attention", "--tp-size", "2",
                        "--enable-helix"],
     ["--attention-backend flex_attention", "use --attention-backend torch_native or triton"]),
    ("ngram-default-breadth", CPU_HELIX + ["--page-size", "4", "--speculative-algorithm", "NGRAM"],
     ["--speculative-ngram-max-bfs-breadth 10", "set --speculative-ngram-max-bfs-breadth 1"]),
    ("dp-attention-gqa", ["--device", "cpu", "--attention-backend", "torch_native", "--tp-size", "4",
                          "--enable-helix", "--enable-dp-attention", "--dp-size", "2"],
     ["--attn-dp-size 2", "Helix runs DP attention for DeepSeek MLA models only", "--dp-size 2 replicas"]),
]
EARLY_REFUSALS = [
    ("kvp-x-tpa-not-tp", CPU_HELIX + ["--helix-kvp-size", "2", "--helix-tpa-size", "2"],
     ["--helix-kvp-size 2 x --helix-tpa-size 2 = 4 != --tp-size 2", "set --tp-size 4"]),
    ("hicache-storage-mooncake", CPU_HELIX + ["--page-size", "4", "--enable-hierarchical-cache",
                                              "--hicache-storage-backend", "mooncake"],
     ["--enable-hierarchical-cache with --hicache-storage-backend mooncake",
      "use --hicache-storage-backend file"]),
    ("pd-prefill", CPU_HELIX + ["--page-size", "4", "--disaggregation-mode", "prefill"],
     ["--disaggregation-mode prefill", "start the prefill server without --enable-helix"]),
    ("unchunked", CPU_HELIX + ["--page-size", "4", "--chunked-prefill-size", "-1"],
     ["--chunked-prefill-size -1 disables chunked prefill", "give a positive size"]),
    ("dcp", CPU_HELIX + ["--dcp-size", "2"], ["--dcp-size 2", "drop --dcp-size"]),
    ("block-scaled-kv", CPU_HELIX + ["--kv-cache-dtype", "nvfp4"],
     ["--kv-cache-dtype nvfp4", "use --kv-cache-dtype auto, bf16, fp8_e4m3 or fp8_e5m2"]),
    ("standalone", CPU_HELIX + ["--speculative-algorithm", "STANDALONE"],
     ["--speculative-algorithm STANDALONE", "--speculative-algorithm NGRAM --speculative-ngram-max-bfs-breadth 1"]),
]
ACCEPTED = [("bare", CPU_HELIX),
            ("hicache-file", CPU_HELIX + ["--page-size", "4", "--enable-hierarchical-cache",
                                          "--hicache-write-policy", "write_back",
                                          "--hicache-storage-backend", "file"]),
            ("pp", CPU_HELIX + ["--page-size", "4", "--pp-size", "2"]),
            ("dp-replicas", CPU_HELIX + ["--page-size", "4", "--dp-size", "2"]),
            ("mixed-chunk", CPU_HELIX + ["--page-size", "4", "--enable-mixed-chunk"])]

RESOLVE_SCRIPT = r"""
import dataclasses, io, json, logging, sys
from sglang_helix.srt.cpu import sgl_kernel_stub; sgl_kernel_stub.install()
from sglang_helix.srt import plugin; plugin.register()
from sglang.srt.plugins.hook_registry import HookRegistry; HookRegistry.apply_hooks()
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.server_args import prepare_server_args
from sglang_helix.rules.flags import HelixServerArgs
from sglang_helix.rules.server import ServerLayout

log = io.StringIO()
handler = logging.StreamHandler(log)
logging.getLogger("sglang_helix").addHandler(handler)
logging.getLogger("sglang_helix").setLevel(logging.INFO)
spec = json.load(open(sys.argv[1]))
out = {}
for case_id, argv in spec["resolve"]:
    log.seek(0); log.truncate()
    try:
        sa = prepare_server_args(argv)
        sa.resolve_once()
        view = resolved_view(sa)
        graphs = view.cuda_graph_config
        out[case_id] = {"ok": True, "page_size": view.page_size, "log": log.getvalue(),
                        "backends": [view.prefill_attention_backend, view.decode_attention_backend],
                        "graphs": [str(graphs.prefill.backend), str(graphs.decode.backend)]}
    except (Exception, SystemExit) as exc:  # SystemExit: SGLang's own argparse refusals
        out[case_id] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
parsed = {}
for line in spec["parse"]:
    sa = prepare_server_args(line.split()[3:])
    helix = getattr(sa, "_helix_args", None) or HelixServerArgs()
    parsed[line] = {"layout": dataclasses.asdict(ServerLayout.of(sa)), "helix": dataclasses.asdict(helix)}
defaults = prepare_server_args(["--model-path", "m"])
import argparse
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
spellings = {a.dest: a.option_strings for a in parser._actions}
print("RESULT " + json.dumps({"cases": out, "parsed": parsed, "spellings": spellings,
                              "defaults": dataclasses.asdict(ServerLayout.of(defaults)),
                              "help": parser.format_help()}))
"""


def _sglang_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_HELIX", "SGLANG_PLUGINS")}
    env.update({"SGLANG_USE_CPU_ENGINE": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _model_dir(tmp, name: str, config: dict | None):
    path = tmp / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


# Planner sweeps: models x hardware x precision x context x GPUs, with and without a latency
# bound; DeepSeek-R1 and Kimi-K2 at fp4 are Helix lines on NVFP4 checkpoints (accepted by the rules).
PLANNER_RUNS = [
    [*run, *bound]
    for model in ("deepseek-r1", "llama-405b", "llama-70b", "qwen3-235b", "kimi-k2")
    for run in (["--model", model, "--context", "1M", "--gpus", "64", "--hardware", "gb200", "--precision", "fp4"],
                ["--model", model, "--context", "128K", "--gpus", "8", "--hardware", "h200", "--precision", "fp8"],
                ["--model", model, "--context", "64K", "--gpus", "16", "--hardware", "h100", "--precision", "fp8"],
                ["--model", model, "--context", "1M", "--gpus", "32", "--hardware", "b200", "--precision", "bf16"])
    for bound in ([], ["--max-ttl-ms", "20"])
]


def _planner_lines() -> dict[str, str]:
    """Every launch line the planner CLI prints over PLANNER_RUNS -> its --model."""
    lines = {}
    for argv in PLANNER_RUNS:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(argv)
        assert rc in (0, 2), err.getvalue()
        for text in out.getvalue().splitlines():
            if text.strip().startswith("python -m sglang.launch_server"):
                lines[text.strip()] = argv[1]
    return lines


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """Every case resolved in one fresh interpreter; every planner line parsed there."""
    tmp = tmp_path_factory.mktemp("refusals")
    llama = _model_dir(tmp, "tiny-llama", LLAMA_CONFIG)
    no_config = _model_dir(tmp, "no-config", None)
    cases = [(cid, ["--model-path", str(llama), *flags]) for cid, flags, _ in REFUSALS]
    cases += [(cid, ["--model-path", str(no_config), *flags]) for cid, flags, _ in EARLY_REFUSALS]
    cases += [(cid, ["--model-path", str(llama), *flags]) for cid, flags in ACCEPTED]
    lines = _planner_lines()
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"resolve": cases, "parse": sorted(lines)}))
    proc = subprocess.run([sys.executable, "-c", RESOLVE_SCRIPT, str(spec)], cwd=tmp,
                          env=_sglang_env(SGLANG_PLUGINS="none"), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and found, proc.stderr[-4000:]
    return {**json.loads(found[0][len("RESULT "):]), "lines": lines}


@pytest.mark.parametrize("case_id, flags, expected", REFUSALS + EARLY_REFUSALS,
                         ids=[c[0] for c in REFUSALS + EARLY_REFUSALS])
def test_refusal_names_the_flag_and_the_fix(resolved, case_id, flags, expected):
    """Refused in SGLang's resolution with HelixConfigError("Helix: ..."), the message naming the
    flag and the fix. EARLY_REFUSALS' model directory has no config.json: they are refused
    before SGLang reads it."""
    result = resolved["cases"][case_id]
    assert not result["ok"], result
    assert result["type"] == "HelixConfigError", result
    assert result["message"].startswith("Helix: ")
    assert all(text in result["message"] for text in expected), result["message"]


def test_bare_enable_helix_gets_the_helix_page_size_and_passes_validation(resolved):
    """No --page-size: the plugin declares 64 (SGLang's default 1 would be refused), the late
    hook logs the resolved layout and the "helix" backend is declared for prefill and decode."""
    result = resolved["cases"]["bare"]
    assert result["ok"], result
    assert result["page_size"] == 64 and result["backends"] == ["helix", "helix"]
    assert "sglang_helix: --page-size not given; using 64 for Helix" in result["log"]
    assert "page_size=64; attention backend helix" in result["log"]


def test_cpu_launch_resolves_cuda_graphs_off(resolved):
    """SGLang's resolved CudaGraphConfig (what its graph runners read) on the CPU engine under
    Helix: prefill and decode graphs disabled (the CUDA cases: tests/srt/test_plugin.py)."""
    assert resolved["cases"]["bare"]["graphs"] == ["disabled", "disabled"]


def test_sglang_help_lists_the_helix_group(resolved):
    """SGLang's own parser with the plugin's AFTER hook on add_cli_args: `--help` shows the group."""
    text = resolved["help"]
    assert "\nHelix:\n" in text
    for flag in ("--enable-helix", "--helix-kvp-size", "--helix-tpa-size",
                 "--helix-comm-backend {a2a,ag_rs,nvshmem}", "--helix-hopb-slices"):
        assert flag in text, flag


def test_hicache_with_the_file_storage_tier_passes_validation(resolved):
    """HiCache (write-back, file storage) resolves with Helix: the host tier per KVP rank."""
    result = resolved["cases"]["hicache-file"]
    assert result["ok"], result
    assert result["page_size"] == 4 and result["backends"] == ["helix", "helix"]


@pytest.mark.parametrize("case_id, where", [("pp", " in each of 2 PP stages;"),
                                            ("dp-replicas", " in each of 2 DP replicas;"),
                                            ("mixed-chunk", "N=2 = KVP 1 x TPA 2; FFN dense TP = 2")])
def test_pipeline_stages_dp_replicas_and_mixed_chunk_pass_validation(resolved, case_id, where):
    """Served with Helix (no refusal): the layout line says each stage / replica is one Helix group."""
    result = resolved["cases"][case_id]
    assert result["ok"], result
    assert result["backends"] == ["helix", "helix"] and where in result["log"], result["log"]


def test_layout_defaults_and_flags_are_sglangs(resolved):
    """ServerLayout's defaults are what SGLang's parser gives for an absent flag, and a launch
    line reads the same with the rules' parser as with SGLang's (checked on the planner's lines)."""
    assert resolved["defaults"] == {**dataclasses.asdict(ServerLayout()), "model_path": "m"}
    assert sorted(dest for _, dest, _ in SGLANG_FLAGS) == sorted(f.name for f in dataclasses.fields(ServerLayout))
    for flags, dest, _ in SGLANG_FLAGS:
        assert sorted(flags) == sorted(resolved["spellings"][dest]), dest


def test_every_planner_line_passes_the_plugin_rules_as_sglang_parses_it(resolved):
    """Each line the planner prints, parsed by SGLang's own parser with the plugin's Helix group
    (as the plugin reads a launch), gives the rules' ServerLayout and Helix flags, and passes
    check_launch (the function the plugin's late hook runs) with the model and weights it serves.
    Helix lines at fp4 MLA weights (NVFP4 checkpoints) are among them."""
    lines = resolved["lines"]
    assert any("--enable-helix" in line for line in lines) and any("--enable-helix" not in line for line in lines)
    assert any("--enable-helix" in line and "DeepSeek-R1-fp4" in line for line in lines)
    for line, model in lines.items():
        parsed = resolved["parsed"][line]
        argv = shlex.split(line)
        layout, helix = ServerLayout(**parsed["layout"]), HelixServerArgs(**parsed["helix"])
        assert layout == layout_from_argv(argv) and helix == parse_helix_argv(argv), line
        spec = get_model(model)
        info = ModelInfo(spec.architecture, spec.num_heads, spec.num_kv_heads, spec.mla, spec.num_experts)
        cfg = check_launch(helix, layout, info, search.line_weights(spec, argv))
        assert (cfg is not None) == ("--enable-helix" in argv), line


@NEEDS_SGLANG
def test_launch_server_cli_exits_non_zero_with_the_refusal_before_weights(tmp_path):
    """The real CLI: the refusal reaches the user on stderr, the exit code is non-zero, no rank
    loaded a weight."""
    model = _model_dir(tmp_path, "tiny-llama", LLAMA_CONFIG)
    _, flags, expected = REFUSALS[0]
    proc = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *flags],
                          cwd=tmp_path, env=_sglang_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert "HelixConfigError" in proc.stderr
    assert all(text in proc.stderr for text in expected), proc.stderr[-3000:]
    assert "Load weight" not in proc.stderr + proc.stdout
