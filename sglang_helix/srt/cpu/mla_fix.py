"""CPU-engine fix for SGLang 0.5.23's DeepSeek MLA on torch_native (Helix on or off).

SGLang's torch_native backend has no DeepSeek handler and falls back to Triton's, whose MHA
prefill attends the latent pool as if it were k/v (crash when kv_lora_rank != qk_nope_head_dim,
wrong tokens when equal). With SGLANG_USE_CPU_ENGINE=1 the torch_native handler is pointed at the
absorbed path (correct for any shape). Inert off the CPU engine: its one hook (AROUND
`AttentionBackendRegistry.get_handler`, srt.hook_table) is installed only there (fix
"absorbed-mla" in srt.cpu.fixes; SGLANG_HELIX_CPU_MLA_FIX=0 opts out).
"""

from __future__ import annotations

from typing import Any, Callable

CPU_BACKENDS = ("torch_native",)


def _torch_native_mla_handler(attn: Any, forward_batch: Any):
    """Every torch_native MLA forward (prefill included) takes the absorbed path."""
    from sglang.srt.models.deepseek_common.attention_backend_handler import _dispatch_mla_subtype

    return _dispatch_mla_subtype(attn, forward_batch)


def _around_get_handler(original: Callable, registry: Any, backend_name: str, *args, **kwargs):
    if backend_name in CPU_BACKENDS:
        return _torch_native_mla_handler
    return original(registry, backend_name, *args, **kwargs)
