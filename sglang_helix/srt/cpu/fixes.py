"""The CPU-engine fixes, one registry: each fix's name, why it exists, and how to opt out.

A fix is a module of this package holding plain functions; its hooks are rows of the one hook
table (srt.hook_table, column `cpu_fix`), installed only where the fix is enabled: SGLang's CPU
engine (SGLANG_USE_CPU_ENGINE=1), unless its opt-out variable is "0". The fixes apply with Helix
on or off, so nothing in srt/cpu imports Helix; where a target is shared with Helix (SGLang's
`KVCacheConfigurator.configure`, the draft backend factory) the Helix hook owns the row and calls
the fix's function when Helix is off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .sgl_kernel_stub import cpu_engine_requested


@dataclass(frozen=True)
class CpuFix:
    """One CPU-engine fix: `name` (the table's cpu_fix), its `module` in srt/cpu, one line of why,
    and the environment variable that turns it off with "0" (None: always on the CPU engine)."""

    name: str
    module: str
    why: str
    opt_out_env: str | None = None

    def enabled(self, environ: Mapping[str, str] | None = None) -> bool:
        """True on the CPU engine unless opted out."""
        env = os.environ if environ is None else environ
        if not cpu_engine_requested(env):
            return False
        return self.opt_out_env is None or env.get(self.opt_out_env, "1") != "0"


CPU_FIXES = (
    CpuFix("absorbed-mla", "mla_fix",
           "torch_native has no DeepSeek MLA handler and falls back to Triton's MHA prefill, which "
           "reads the latent pool as k/v (crash or wrong tokens): every forward takes the absorbed path",
           "SGLANG_HELIX_CPU_MLA_FIX"),
    CpuFix("threads", "threads_fix",
           "SGLang applies a rank's SGLANG_CPU_OMP_THREADS_BIND cores only on AMX / arm64 CPUs; "
           "elsewhere N ranks run N x N spinning torch threads", "SGLANG_HELIX_CPU_THREADS_FIX"),
    CpuFix("native-moe", "moe_fix",
           "SGLang's native torch MoE dies on EP's -1 expert ids and on 0-token batches",
           "SGLANG_HELIX_CPU_MOE_FIX"),
    CpuFix("fp8-weights", "fp8_fix",
           "block-fp8 checkpoints need AMX kernels (sgl-kernel CPU build, not on PyPI): an exact "
           "torch W8A16 path instead; MLA's kv_b_proj dequantized as on CUDA, not requantized; "
           "per-tensor fp8's fused shards keep their own scales (as on sm90), not requantized by "
           "a CUDA-only kernel"),
    CpuFix("ct-fp8-weights", "ct_fp8_fix",
           "compressed-tensors checkpoints ask torch.cuda for a compute capability: on CPU, SGLang's "
           "weight-only fp8 scheme with the torch W8A16 path instead of Marlin; other schemes refused"),
    CpuFix("nvfp4-weights", "nvfp4_fix",
           "NVFP4 (ModelOpt) checkpoints need CUDA fp4 kernels (Blackwell, or Marlin on SM80+) and "
           "the NVFP4 MoE method refuses every other platform: an exact torch weight-only (W4A16) "
           "path instead"),
    CpuFix("fp8-kv", "fp8_kv_fix",
           "KVCacheConfigurator.configure refuses fp8_e4m3 KV on CPU without AMX although "
           "torch_native and the Helix pools read fp8 pages: step over that one check"),
    CpuFix("ngram-spec", "spec_fix",
           "NGRAM speculative decoding calls sgl-kernel CPU ops that do not exist here and "
           "torch_native has no TARGET_VERIFY path: exact torch versions"),
    CpuFix("eagle", "eagle_fix",
           "DeepSeek NEXTN (EAGLE worker) calls sgl-kernel CPU ops, CUDA cache calls and has no "
           "torch_native draft backends: exact torch versions and torch_native draft backends"),
    CpuFix("hicache", "hicache_fix",
           "HiCache host pools pin memory with cudaHostRegister: plain host memory instead"),
    CpuFix("dp-attention", "dp_attention_fix",
           "DP attention pads batches and asks the attention backend for the padding rows' seq_len, "
           "which torch_native does not define: intel_amx's value (1)",
           "SGLANG_HELIX_CPU_DP_ATTENTION_FIX"),
    CpuFix("pd-host-path", "pd_fix",
           "PD transfers use pinned memory, CUDA events and cudaHostRegister: the host paths instead"),
)
_BY_NAME = {fix.name: fix for fix in CPU_FIXES}


def cpu_fix(name: str) -> CpuFix:
    """The registered fix called `name` (KeyError names the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no CPU fix {name!r}; known: {', '.join(_BY_NAME)}") from None
