"""CPU engine, Helix off: fp8 KV cache (`--kv-cache-dtype fp8_e4m3`) with torch_native, without AMX.

Why: SGLang 0.5.23's `KVCacheConfigurator.configure` refuses fp8_e4m3 KV on CPU as its first
statement ("CPU FP8 KV cache is only supported for MHA" / "requires Intel AMX support" /
"requires the intel_amx attention backend"). Its torch_native backend nevertheless reads fp8 pages
correctly: the MHA pool's CPU fp8 method stores `x` cast to fp8 and torch_native upcasts with
`.to(q.dtype)`; the MLA pool stores uint8 read through fp8 views (the plugin's absorbed-MLA fix
routes torch_native MLA there). So the only obstacle to serving fp8 KV with Helix off on CPU (the
reference Helix on is compared against, and the plain prefill server of a PD pair) is that check.

What: with Helix off, on the CPU engine without AMX, torch_native only, fp8_e4m3: configure runs
past that one check (srt.memory.hooks.configure_past_cpu_fp8_check, the same step Helix on takes).
torch_native never applies per-layer KV scales, so a checkpoint that carries k/v scales other
than 1 is refused here with the flag and the fix instead of being served silently wrong.

Inert on GPU (installed only on the CPU engine) and wherever SGLang's own check passes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..hooks import HookSpec

# srt.memory.hooks is imported inside the hook: it loads SGLang's memory pools, which on the CPU
# engine may import only after register() installed the sgl_kernel stand-in.
CONFIGURE_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.configure"


class CpuFp8KvError(ValueError):
    """fp8 KV with Helix off on CPU that torch_native would serve wrong; names the fix."""


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


def _around_configure(original: Callable, kvc: Any, *args: Any, **kwargs: Any):
    from ..memory.hooks import (config_of_configurator, configure_past_cpu_fp8_check,
                                cpu_fp8_refused)

    if (config_of_configurator(kvc) is not None or not cpu_fp8_refused(kvc)
            or not _torch_native_only() or not _no_amx()):
        return original(kvc, *args, **kwargs)
    check_unit_kv_scales(getattr(kvc, "model", None))
    return configure_past_cpu_fp8_check(original, kvc, *args, **kwargs)


CPU_FP8_KV_HOOKS = (HookSpec(CONFIGURE_TARGET, "AROUND", _around_configure),)
