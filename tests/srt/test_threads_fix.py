"""The CPU-engine torch-threads fix (sglang_helix.srt.cpu.threads_fix): pure rules and the hook on
SGLang's own _init_cpu_threads_env (a real server's log: tests/e2e/test_serve_mla.py); where it is
installed: tests/srt/test_hook_table.py."""

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


SGLANG_CHECKS = {"threads: torch threads follow the rank's cores after SGLang's own step": """
import os, types, unittest.mock as um
import torch
import sglang.srt.distributed.bootstrap as b
saved = (b._is_cpu_amx_available, b._is_cpu_arm64, torch.get_num_threads(), os.environ.pop("OMP_NUM_THREADS", None))
try:
    b._is_cpu_amx_available = b._is_cpu_arm64 = False
    torch.set_num_threads(7)
    b._init_cpu_threads_env(local_omp_cpuid="0-2", dist_init_method=None)
    assert torch.get_num_threads() == 3, torch.get_num_threads()
    b._init_cpu_threads_env(local_omp_cpuid="1", dist_init_method=None)
    assert torch.get_num_threads() == 1
    b._is_cpu_arm64 = True  # SGLang binds (here through a stand-in kernel): left alone
    kernel = types.SimpleNamespace(init_cpu_threads_env=lambda c: None, initialize=lambda n, r: None)
    with um.patch.object(torch.ops, "sgl_kernel", kernel), \
            um.patch.object(b, "get_parallel", lambda: types.SimpleNamespace(tp_size=1, tp_rank=0)), \
            um.patch.object(b, "_set_shm_master_env", lambda m: None):
        torch.set_num_threads(5)
        b._init_cpu_threads_env(local_omp_cpuid="0-2", dist_init_method=None)
    assert torch.get_num_threads() == 5
finally:
    b._is_cpu_amx_available, b._is_cpu_arm64 = saved[:2]
    torch.set_num_threads(saved[2])
    if saved[3] is not None:
        os.environ["OMP_NUM_THREADS"] = saved[3]
"""}


@needs_sglang
def test_hook_sets_torch_threads_after_sglangs_own_step(sglang_checks):
    """SGLang's real _init_cpu_threads_env, wrapped: on a CPU SGLang does not bind (no AMX, not
    arm64) the rank's torch threads become its core count; where SGLang binds, untouched."""
    sglang_checks.assert_ok("threads: torch threads follow the rank's cores after SGLang's own step")
