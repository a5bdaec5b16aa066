"""sglang_helix.srt.plugin against the installed SGLang 0.5.23 (CPU engine), plus the sgl_kernel stub.

SGLang itself runs only in subprocesses (with timeouts) so its global hook state never leaks into
the pytest process. No model weights are loaded anywhere: the launch tests stop in resolution.
The launch refusals are in test_launch_refusals.py (batched in one interpreter).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from helpers import TINY_LLAMA_CONFIG

from sglang_helix.srt.cpu import sgl_kernel_stub as stub

# find_spec imports nothing: spawned children re-import this module and must stay light.
needs_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="sglang not installed"
)

TIMEOUT_S = 150


def sglang_env(**extra: str | None) -> dict[str, str]:
    """The test process's environment for an SGLang child; an `extra` value None removes it."""
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_HELIX", "SGLANG_PLUGINS")}
    env.update({"SGLANG_USE_CPU_ENGINE": "1", "PYTHONUNBUFFERED": "1", **extra})
    return {k: v for k, v in env.items() if v is not None}


def run_py(args: list[str], tmp_path, **extra_env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=sglang_env(**extra_env),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )


@pytest.fixture
def tiny_llama(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    return model_dir


# ------------------------------------------------------------------ entry point / CLI


@needs_sglang
def test_entry_point_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "helix"]
    assert eps, "reinstall: pip install --no-deps -e . (entry point sglang.srt.plugins: helix)"
    assert eps[0].value == "sglang_helix.srt.plugin:register"
    from sglang_helix.srt.plugin import register

    assert eps[0].load() is register


# ------------------------------------------------------------------ hooks in one SGLang process

# Runs in the one hook-probe interpreter (tests/srt/conftest.py): the plugin registered and applied.
HELIX_ARGS_CHECK = f"""
import json, multiprocessing as mp, pathlib, pickle, tempfile
from sglang.srt.server_args import prepare_server_args
model = pathlib.Path(tempfile.mkdtemp()) / "tiny-llama"
model.mkdir()
(model / "config.json").write_text(json.dumps({TINY_LLAMA_CONFIG!r}))
plain = prepare_server_args(["--model-path", str(model), "--device", "cpu"])
assert not hasattr(plain, "_helix_args")
plain.resolve_once()                   # non-Helix resolution passes through our hooks
sa = prepare_server_args(["--model-path", str(model), "--device", "cpu", "--tp-size", "4",
                          "--enable-helix", "--helix-kvp-size", "2",
                          "--helix-tpa-size", "2", "--helix-hopb-slices", "2"])
expected = ("HelixServerArgs(enable_helix=True, helix_kvp_size=2, helix_tpa_size=2, "
            "helix_comm_backend='a2a', helix_hopb_slices=2, helix_mla_exchange=None, "
            "helix_exchange_dtype='fp32')")
assert repr(sa._helix_args) == expected, repr(sa._helix_args)
assert repr(pickle.loads(pickle.dumps(sa))._helix_args) == expected
with mp.get_context("spawn").Pool(1) as pool:
    assert pool.apply(repr, (sa._helix_args,)) == expected
    assert pool.apply(getattr, (sa, "_helix_args")) == sa._helix_args
"""
SGLANG_CHECKS = {"plugin: Helix args stored, pickled, seen by a spawned child": HELIX_ARGS_CHECK}


@needs_sglang
def test_hooks_store_helix_args_that_survive_pickle_and_spawn(sglang_checks):
    sglang_checks.assert_ok("plugin: Helix args stored, pickled, seen by a spawned child")


# ------------------------------------------------------------------ resolved CUDA graphs


RESOLVE_SCRIPT = """
import sys
from sglang_helix.srt.cpu import sgl_kernel_stub; sgl_kernel_stub.install()
from sglang_helix.srt import plugin; plugin.register()
from sglang.srt.plugins.hook_registry import HookRegistry; HookRegistry.apply_hooks()
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.server_args import prepare_server_args
for flags in sys.argv[2:]:
    sa = prepare_server_args(["--model-path", sys.argv[1], "--tp-size", "2", "--enable-helix",
                              *flags.split()])
    sa.resolve_once()
    graphs = resolved_view(sa).cuda_graph_config
    print("GRAPHS", flags, "|", graphs.prefill.backend, graphs.decode.backend)
"""


def _resolved_graphs(tmp_path, model, cases, cpu_engine):
    proc = run_py(["-c", RESOLVE_SCRIPT, str(model), *cases], tmp_path, SGLANG_PLUGINS="none",
                  SGLANG_USE_CPU_ENGINE=cpu_engine)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [ln.split("|", 1)[1].split() for ln in proc.stdout.splitlines() if ln.startswith("GRAPHS")]


@needs_sglang
def test_resolved_cuda_graphs_under_helix_on_cuda(tmp_path, tiny_llama):
    """SGLang's resolved CudaGraphConfig (what its graph runners read) with --device cuda:
    prefill graphs off under Helix, decode graphs kept unless a blocker (HOP-B > 1) applies.
    Resolution only: no GPU is touched. Both cases in one interpreter (the CPU engine off)."""
    got = _resolved_graphs(tmp_path, tiny_llama, [
        "--device cuda --attention-backend triton",
        "--device cuda --attention-backend triton --helix-kvp-size 2 --helix-hopb-slices 2"], "0")
    assert got == [["disabled", "full"], ["disabled", "disabled"]], got


@needs_sglang
def test_plugin_sets_the_cpu_engine_for_ranks_it_did_not_start_with(tmp_path, tiny_llama):
    """Started without SGLANG_USE_CPU_ENGINE: the plugin sets it for the ranks during resolution,
    after register() chose its hook tables, and its liveness check must not then expect the
    CPU-only hooks this process never installed (the CPU engine case itself:
    tests/srt/test_launch_refusals.py)."""
    got = _resolved_graphs(tmp_path, tiny_llama, ["--device cpu --attention-backend torch_native"], None)
    assert got == [["disabled", "disabled"]], got


# ------------------------------------------------------------------ sgl_kernel stand-in


@pytest.fixture
def clean_stub(monkeypatch):
    if stub.MODULE_NAME in sys.modules and not stub.is_stub_module(sys.modules[stub.MODULE_NAME]):
        pytest.skip("a real sgl_kernel is imported in this process")
    was_installed = stub.MODULE_NAME in sys.modules or stub._installed_dir is not None
    stub._reset_for_tests()
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    stub._reset_for_tests()
    if was_installed:  # later tests in this process (e.g. the pool tests) import SGLang's CPU engine
        monkeypatch.undo()
        stub.install({"SGLANG_USE_CPU_ENGINE": "1"})


def _child_imports_sgl_kernel(queue) -> None:
    import sgl_kernel

    queue.put((stub.is_stub_module(sgl_kernel), sorted(n for n in stub.CPU_SYMBOLS if hasattr(sgl_kernel, n))))


def test_stub_not_installed_without_cpu_engine(clean_stub):
    assert stub.needs_stub({}) is False
    assert stub.install({"SGLANG_USE_CPU_ENGINE": "0"}) is False
    assert importlib.util.find_spec("sgl_kernel") is None


def test_stub_installs_when_absent_and_raises_when_called(clean_stub):
    if stub.real_sgl_kernel_available():
        pytest.skip("a real sgl_kernel is installed")
    assert stub.install({"SGLANG_USE_CPU_ENGINE": "1"}) is True
    assert stub.install({"SGLANG_USE_CPU_ENGINE": "1"}) is True  # idempotent
    module = importlib.import_module("sgl_kernel")
    assert stub.is_stub_module(module)
    for name in stub.CPU_SYMBOLS:
        with pytest.raises(stub.SglKernelCpuStubError, match=f"sgl_kernel.{name} was called"):
            getattr(module, name)(1, 2)
    # SGLang's spawned ranks inherit sys.path and import the stand-in without our code running
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_imports_sgl_kernel, args=(queue,))
    child.start()
    is_stub, names = queue.get(timeout=60)
    child.join(timeout=60)
    assert is_stub and names == sorted(stub.CPU_SYMBOLS)


def test_stub_never_shadows_a_real_sgl_kernel(clean_stub, tmp_path):
    (tmp_path / "sgl_kernel.py").write_text("REAL = True\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    assert stub.install({"SGLANG_USE_CPU_ENGINE": "1"}) is False
    module = importlib.import_module("sgl_kernel")
    assert getattr(module, "REAL", False) and not stub.is_stub_module(module)
    del sys.modules["sgl_kernel"]
