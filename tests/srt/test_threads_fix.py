"""The CPU-engine torch-threads fix (sglang_helix.srt.cpu.threads_fix): pure rules, tables, and
the hook on SGLang's own _init_cpu_threads_env (a real server's log: tests/e2e/test_serve_mla.py)."""

import importlib.util

import pytest

from sglang_helix.srt.cpu import threads_fix

needs_sglang = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang")


@pytest.mark.parametrize("cpuids, count", [("3", 1), ("0-15", 16), ("0-15,32-47", 32), ("1,3, 5", 3),
                                           ([0, 1], 2), ((4,), 1)])
def test_cpu_count_of_bind_groups(cpuids, count):
    assert threads_fix.cpu_count_of(cpuids) == count


@pytest.mark.parametrize("bad, message", [("5-2", "runs backwards"), (",", "no core"), ("x", "invalid literal")])
def test_cpu_count_of_refuses_bad_groups(bad, message):
    with pytest.raises(ValueError, match=message):
        threads_fix.cpu_count_of(bad)


def test_threads_to_set_leaves_sglang_and_the_user_alone():
    assert threads_fix.threads_to_set("0", False, {}) == 1
    assert threads_fix.threads_to_set("0-3", False, {"X": "1"}) == 4
    assert threads_fix.threads_to_set("0-3", True, {}) is None  # AMX / arm64: SGLang binds
    assert threads_fix.threads_to_set("0-3", False, {"OMP_NUM_THREADS": "2"}) is None
    assert threads_fix.threads_to_set(None, False, {}) is None


@needs_sglang
def test_in_the_cpu_engine_tables_and_the_liveness_checks(monkeypatch):
    from sglang_helix.srt.cpu import sgl_kernel_stub

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    sgl_kernel_stub.install()  # plugin's serving tables import SGLang modules that need it
    from sglang_helix.srt import plugin

    name = "CPU torch threads per rank"
    monkeypatch.delenv(threads_fix.CPU_FIX_ENV, raising=False)
    assert (name, threads_fix.CPU_THREADS_HOOKS) in plugin.serving_hooks(True)
    assert name not in dict(plugin.serving_hooks(False))
    monkeypatch.setattr(plugin, "_cpu_engine_hooks", True)
    assert f"{name} hooks" in dict(plugin._liveness_checks())
    monkeypatch.setenv(threads_fix.CPU_FIX_ENV, "0")
    assert name not in dict(plugin.serving_hooks(True))
    assert not threads_fix.install_cpu_threads_fix({"SGLANG_USE_CPU_ENGINE": "0"})


@needs_sglang
def test_hook_sets_torch_threads_after_sglangs_own_step_subprocess():
    """SGLang's real _init_cpu_threads_env, wrapped: on a CPU SGLang does not bind (no AMX, not
    arm64) the rank's torch threads become its core count; where SGLang binds, untouched."""
    from helpers import check_hooks_apply

    check_hooks_apply(
        "sglang_helix.srt.cpu.threads_fix", "CPU_THREADS_HOOKS", 1,
        before="import os\nos.environ.pop('OMP_NUM_THREADS', None)\n",
        after=("import torch\n"
               "import sglang.srt.distributed.bootstrap as b\n"
               "b._is_cpu_amx_available = b._is_cpu_arm64 = False\n"
               "torch.set_num_threads(7)\n"
               "b._init_cpu_threads_env(local_omp_cpuid='0-2', dist_init_method=None)\n"
               "assert torch.get_num_threads() == 3, torch.get_num_threads()\n"
               "b._init_cpu_threads_env(local_omp_cpuid='1', dist_init_method=None)\n"
               "assert torch.get_num_threads() == 1\n"
               "b._is_cpu_arm64 = True\n"
               "import types, unittest.mock as um\n"
               "kernel = types.SimpleNamespace(init_cpu_threads_env=lambda c: None, initialize=lambda n, r: None)\n"
               "with um.patch.object(torch.ops, 'sgl_kernel', kernel), "
               "um.patch.object(b, 'get_parallel', lambda: types.SimpleNamespace(tp_size=1, tp_rank=0)), "
               "um.patch.object(b, '_set_shm_master_env', lambda m: None):\n"
               "    torch.set_num_threads(5)\n"
               "    b._init_cpu_threads_env(local_omp_cpuid='0-2', dist_init_method=None)\n"
               "assert torch.get_num_threads() == 5\n"))
