"""The CPU multi-rank environment the plugin sets for SGLang CPU ranks (srt.cpu.env)."""

from __future__ import annotations

import pytest

from sglang_helix.srt.cpu.env import (
    MISSING_NCCL_SO,
    NCCL_SO_PATH,
    THREADS_BIND,
    USE_CPU_ENGINE,
    apply_cpu_env,
    cpu_env_changes,
    threads_bind_value,
)


def test_threads_bind_one_core_per_rank():
    assert threads_bind_value(2, [3, 1]) == "1|3"
    assert threads_bind_value(3, [0, 1]) == "0|1|0"  # oversubscribed: wraps
    with pytest.raises(ValueError):
        threads_bind_value(0, [0])


def test_cpu_env_changes_leave_user_values():
    changes = cpu_env_changes(2, {THREADS_BIND: "0-3|4-7"}, [0, 1])
    assert changes == {USE_CPU_ENGINE: "1", NCCL_SO_PATH: MISSING_NCCL_SO}
    assert cpu_env_changes(2, {}, [0, 1])[THREADS_BIND] == "0|1"


def test_apply_cpu_env_mutates_given_mapping_only():
    env = {NCCL_SO_PATH: "/x/libnccl.so"}
    applied = apply_cpu_env(2, env)
    assert env[NCCL_SO_PATH] == "/x/libnccl.so" and NCCL_SO_PATH not in applied
    assert env[USE_CPU_ENGINE] == "1" and len(env[THREADS_BIND].split("|")) == 2
