"""CPU-engine fix for SGLang 0.5.23's DeepSeek MLA on torch_native (Helix on or off).

SGLang's torch_native backend has no DeepSeek handler and falls back to Triton's, whose MHA
prefill attends the latent pool as if it were k/v (crash when kv_lora_rank != qk_nope_head_dim,
wrong tokens when equal). With SGLANG_USE_CPU_ENGINE=1 the torch_native handler is pointed at the
absorbed path (correct for any shape). Inert off the CPU engine.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..hooks import HookSpec, install, missing_hooks
from .sgl_kernel_stub import cpu_engine_requested

CPU_HANDLER_TARGET = (
    "sglang.srt.models.deepseek_common.attention_backend_handler."
    "AttentionBackendRegistry.get_handler"
)
CPU_BACKENDS = ("torch_native",)
# Opt-out (value "0") for tests that pin SGLang's own, broken CPU MLA behaviour.
CPU_FIX_ENV = "SGLANG_HELIX_CPU_MLA_FIX"


def _torch_native_mla_handler(attn: Any, forward_batch: Any):
    """Every torch_native MLA forward (prefill included) takes the absorbed path."""
    from sglang.srt.models.deepseek_common.attention_backend_handler import _dispatch_mla_subtype

    return _dispatch_mla_subtype(attn, forward_batch)


def _around_get_handler(original: Callable, registry: Any, backend_name: str, *args, **kwargs):
    if backend_name in CPU_BACKENDS:
        return _torch_native_mla_handler
    return original(registry, backend_name, *args, **kwargs)


CPU_MLA_HOOKS = (HookSpec(CPU_HANDLER_TARGET, "AROUND", _around_get_handler),)


def cpu_mla_fix_wanted(environ=None) -> bool:
    """True on the CPU engine unless SGLANG_HELIX_CPU_MLA_FIX=0."""
    env = os.environ if environ is None else environ
    return cpu_engine_requested(env) and env.get(CPU_FIX_ENV, "1") != "0"


def install_cpu_absorbed_mla(environ=None) -> bool:
    """With SGLANG_USE_CPU_ENGINE=1, route every torch_native MLA forward to the absorbed path.

    Returns True if registered; a no-op (False) off the CPU engine or with
    SGLANG_HELIX_CPU_MLA_FIX=0. Idempotent.
    """
    if not cpu_mla_fix_wanted(environ):
        return False
    install(CPU_MLA_HOOKS)
    return True


def cpu_absorbed_mla_missing() -> list[str]:
    """[] once the CPU fix wraps AttentionBackendRegistry.get_handler."""
    return missing_hooks(CPU_MLA_HOOKS)
