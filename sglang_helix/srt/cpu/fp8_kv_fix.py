"""CPU engine: fp8 KV cache (`--kv-cache-dtype fp8_e4m3`) past SGLang's AMX-only configure check.

Why: SGLang 0.5.23's `KVCacheConfigurator.configure` refuses fp8_e4m3 KV on CPU as its first
statement ("CPU FP8 KV cache is only supported for MHA" / "requires Intel AMX support" /
"requires the intel_amx attention backend"). That check guards SGLang's own CPU attention
kernels. Its torch_native backend nevertheless reads fp8 pages correctly: the MHA pool's CPU fp8
method stores `x` cast to fp8 and torch_native upcasts with `.to(q.dtype)`; the MLA pool stores
uint8 read through fp8 views (the absorbed-MLA fix routes torch_native MLA there); and the Helix
pools and kernels read fp8 pages on any CPU.

What: `configure_past_cpu_fp8_check` runs configure with the KV dtype read as fp8_e5m2 (another
1-byte fp8 type) for that first comparison only; `restore_kv_dtype`, the AROUND hook on
`_resolve_memory_pool_config` (the next step of configure that reads the dtype), puts the real
dtype back before the pool is sized, and so does the return, whatever happens. Two callers:

- Helix on (any CPU): srt.memory.hooks' configure hook, which owns the `configure` row of the
  hook table;
- Helix off (`configure_helix_off`, called by that same hook): only on the CPU engine without AMX
  and with torch_native only. torch_native never applies per-layer KV scales, so a checkpoint
  that carries k/v scales other than 1 is refused with the flag and the fix instead of being
  served silently wrong.

Inert on GPU and wherever SGLang's own check passes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .fixes import cpu_fix

# id(configurator) -> its real KV dtype while configure reads it as another one
_STEPPED_OVER: dict[int, torch.dtype] = {}


class CpuFp8KvError(ValueError):
    """fp8 KV with Helix off on CPU that torch_native would serve wrong; names the fix."""


def cpu_fp8_refused(kvc: Any) -> bool:
    """SGLang's configure would refuse this KV dtype on this platform (CPU, fp8_e4m3)."""
    from sglang.srt.platforms import current_platform

    return current_platform.is_cpu() and kvc.kv_cache_dtype == torch.float8_e4m3fn


def configure_past_cpu_fp8_check(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """Run configure with the KV dtype read as fp8_e5m2 by its first check only."""
    real = kvc.kv_cache_dtype
    _STEPPED_OVER[id(kvc)] = real
    kvc.kv_cache_dtype = torch.float8_e5m2
    try:
        return original(kvc, *args, **kwargs)
    finally:
        _STEPPED_OVER.pop(id(kvc), None)
        kvc.kv_cache_dtype = real


def restore_kv_dtype(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """AROUND `_resolve_memory_pool_config`: the real KV dtype back before the pool is sized
    (a no-op unless configure_past_cpu_fp8_check is running for this configurator)."""
    real = _STEPPED_OVER.pop(id(kvc), None)
    if real is not None:
        kvc.kv_cache_dtype = real
    return original(kvc, *args, **kwargs)


def _torch_native_only() -> bool:
    from sglang.srt.runtime_context import attention_backends

    return set(attention_backends()) <= {"torch_native"}


def _no_amx() -> bool:
    from sglang.srt.utils.common import cpu_has_amx_support

    return not cpu_has_amx_support()


def check_unit_kv_scales(model: Any) -> None:
    """Refuse per-layer KV scales other than 1: SGLang's torch_native never applies them."""
    for name, module in getattr(model, "named_modules", lambda: [])():
        for attr in ("k_scale", "v_scale"):
            value = getattr(module, attr, None)
            if value is None or not hasattr(value, "numel"):
                continue
            if value.numel() == 1 and float(value) not in (1.0, -1.0):  # -1: "not loaded"
                raise CpuFp8KvError(
                    f"--kv-cache-dtype fp8_e4m3 on CPU without --enable-helix: {name}.{attr} = "
                    f"{float(value)}, and SGLang's torch_native backend ignores KV scales; add "
                    "--enable-helix (its pools and kernels apply them) or use --kv-cache-dtype auto")


def configure_helix_off(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    """`KVCacheConfigurator.configure` of a server without Helix: past SGLang's CPU fp8 check on
    the CPU engine (this fix enabled), torch_native only, no AMX; SGLang's configure otherwise."""
    if (not cpu_fix("fp8-kv").enabled() or not cpu_fp8_refused(kvc)
            or not _torch_native_only() or not _no_amx()):
        return original(kvc, *args, **kwargs)
    check_unit_kv_scales(getattr(kvc, "model", None))
    return configure_past_cpu_fp8_check(original, kvc, *args, **kwargs)
