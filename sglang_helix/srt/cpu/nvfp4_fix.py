"""CPU engine: NVFP4 (ModelOpt) checkpoints, by an exact torch weight-only path.

Why: SGLang 0.5.23 runs an NVFP4 checkpoint (`quant_algo: NVFP4`, ModelOptFp4Config) only through
CUDA kernels: its dense method repacks weights for Blackwell GEMMs (or Marlin on SM80-SM90) in
`process_weights_after_loading` ("native dense GEMM backends require SM100+") and quantizes every
activation to fp4 with flashinfer; its MoE method refuses to be built off Blackwell ("Current
platform does not support NVFP4 quantization with the selected MoE backend"). On the CPU engine an
NVFP4 DeepSeek checkpoint cannot start, Helix on or off.

What (weight-only, "W4A16", as fp8_fix's W8A16 and SGLang's own Marlin fallback compute):
- the MoE method's constructor runs with the platform question answered for this path (its
  Blackwell-or-Marlin check guards CUDA kernels the CPU path never calls); `create_moe_runner`
  records the config and builds no runner (there is no CPU fp4 runner);
- `process_weights_after_loading` (dense and MoE) only marks the layer: the checkpoint's packed
  e2m1 weights, fp8 e4m3 group scales and fp32 global scales stay as loaded (no padding, swizzle
  or repacking);
- a marked dense layer's `apply` dequantizes its weight with SGLang's own `dequantize_nvfp4`
  (e2m1 * (fp8 scale * global scale) in fp32, cast to the activation dtype), each fused partition
  (gate / up of gate_up_proj) with its own `weight_scale_2`, then `F.linear`; a marked MoE runs
  SGLang's `moe_forward_native` over a view whose experts are dequantized one at a time, only the
  experts a batch routes to (w13's gate and up halves with their own global scales). Weights stay
  NVFP4 in memory.
The activation scales (`input_scale`) of SGLang's W4A4 GPU path are not applied: activations stay
in their dtype (bf16), so the result is the checkpoint's dequantized weights applied exactly, the
reference the e2e tests hold servers to. On CUDA SGLang quantizes activations to fp4 (W4A4) on
Blackwell, or runs Marlin's W4A16 on SM80-SM90 (the same weight-only arithmetic as here) and
collapses gate / up to one global scale (ModelOpt exports them equal).

Inert on GPU: the hooks are installed only on the CPU engine (fix "nvfp4-weights" of
srt.cpu.fixes, rows of srt.hook_table), and each calls straight through unless the layer's
weights live on the CPU. Not handled (refused by name): NVFP4-AWQ pre-quant scales, interleaved
w13 checkpoints; W4A16_NVFP4 checkpoints (Marlin-only in SGLang) are not hooked.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

MODELOPT_MODULE = "sglang.srt.layers.quantization.modelopt_quant"
MARK = "_helix_torch_nvfp4"


class CpuNvfp4Error(RuntimeError):
    """An NVFP4 layout the CPU torch path does not implement (names what is missing)."""


def _modelopt() -> Any:
    return importlib.import_module(MODELOPT_MODULE)


def on_cpu(weight: torch.Tensor) -> bool:
    """True where SGLang's NVFP4 methods would need CUDA kernels: the weights live on the CPU."""
    return weight.device.type == "cpu"


def _cpu_engine() -> bool:
    from sglang.srt.utils import is_cpu

    return is_cpu()


# ---------------------------------------------------------------- dequantization


def row_global_scales(scale_2: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """The global scale of every output row [N, 1] (fp32): partition i (rows of width widths[i],
    e.g. gate then up of a fused gate_up_proj) takes scale_2[i]; one scale covers all rows."""
    scale_2 = scale_2.float().reshape(-1)
    if scale_2.numel() == 1:
        return scale_2.reshape(1, 1)
    if scale_2.numel() != len(widths):
        raise CpuNvfp4Error(f"{scale_2.numel()} global scales for {len(widths)} fused partitions "
                            f"{widths}")
    return torch.repeat_interleave(scale_2, torch.tensor(widths)).reshape(-1, 1)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
               widths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 weight [N, K/2] uint8 + fp8 group scales [N, K/16] + global scales (one per fused
    partition of widths, summing to N) -> [N, K] in `dtype`, through SGLang's `dequantize_nvfp4`
    (fp32 e2m1 * (fp8 scale * global scale), one cast)."""
    from sglang.srt.layers.quantization.dequantization import dequantize_nvfp4

    return dequantize_nvfp4(weight, scale, row_global_scales(scale_2, widths), out_dtype=dtype)


def dequantize_weight(layer: Any, dtype: torch.dtype) -> torch.Tensor:
    """The NVFP4 weight of a marked linear layer as `dtype`, [N, K] (output, input features)."""
    widths = list(getattr(layer, "logical_widths", None) or [layer.weight.shape[0]])
    return dequantize(layer.weight, layer.weight_scale, layer.weight_scale_2, widths, dtype)


# ---------------------------------------------------------------- dense layers


def _mark(layer: Any) -> None:
    setattr(layer, MARK, True)


def _around_linear_process(original: Callable, method: Any, layer: Any, *args: Any, **kwargs: Any):
    if not on_cpu(layer.weight):
        return original(method, layer, *args, **kwargs)
    if method.quant_config.is_awq:
        raise CpuNvfp4Error("NVFP4_AWQ pre-quant scales are not applied by the CPU NVFP4 path; "
                            "serve an NVFP4 (not NVFP4_AWQ) checkpoint on CPU")
    _mark(layer)
    return None


def nvfp4_linear(layer: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ dequant(W).T + bias -> [..., N] in x's dtype (weight-only)."""
    if isinstance(x, tuple):
        raise CpuNvfp4Error("pre-quantized fp4 activations reached the CPU NVFP4 path; they come "
                            "from GPU-only fused kernels")
    return F.linear(x, dequantize_weight(layer, x.dtype), bias)


def _around_linear_apply(original: Callable, method: Any, layer: Any, x: Any, bias: Any = None,
                         *args: Any, **kwargs: Any):
    if not getattr(layer, MARK, False):
        return original(method, layer, x, bias, *args, **kwargs)
    return nvfp4_linear(layer, x, bias)


# ---------------------------------------------------------------- MoE experts


class _CpuPlatform:
    """The platform as SGLang's NVFP4 MoE constructor asks it on the CPU engine: its
    Blackwell-or-Marlin refusal guards CUDA kernels this path replaces, so it reads True there."""

    is_blackwell = True

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _platform_for_cpu_path() -> Iterator[None]:
    mod = _modelopt()
    real = mod.get_platform
    mod.get_platform = lambda: _CpuPlatform(real())
    try:
        yield
    finally:
        mod.get_platform = real


def _around_moe_init(original: Callable, method: Any, *args: Any, **kwargs: Any):
    if not _cpu_engine():
        return original(method, *args, **kwargs)
    with _platform_for_cpu_path():
        return original(method, *args, **kwargs)


def _around_moe_runner(original: Callable, method: Any, layer: Any, moe_runner_config: Any,
                       *args: Any, **kwargs: Any):
    if not on_cpu(layer.w13_weight):
        return original(method, layer, moe_runner_config, *args, **kwargs)
    method.moe_runner_config = moe_runner_config
    method.runner = None  # no CPU fp4 runner: apply goes to the native torch MoE
    method._moe_runner_backend = None  # SGLang's "direct kernel on standard top-k output"
    setattr(method, MARK, True)
    return None


def _around_fuses_scaling(original: Callable, quant_method: Any, runner_backend: Any,
                          *args: Any, **kwargs: Any):
    """False for the CPU NVFP4 experts: SGLang folds routed_scaling_factor into the top-k weights
    for every NVFP4 runner but Marlin (its CUDA DeepSeek MoE then skips the multiply), while its
    non-CUDA DeepSeek MoE multiplies the routed output after the experts unconditionally: folding
    it too would apply the factor twice."""
    if getattr(quant_method, MARK, False):
        return False
    return original(quant_method, runner_backend, *args, **kwargs)


def _around_moe_process(original: Callable, method: Any, layer: Any, *args: Any, **kwargs: Any):
    if not on_cpu(layer.w13_weight):
        return original(method, layer, *args, **kwargs)
    if getattr(layer, "inference_moe_w13_interleaved", False):
        raise CpuNvfp4Error("interleaved w13 (gate/up) NVFP4 experts are not handled by the CPU "
                            "NVFP4 path; DeepSeek-style checkpoints store gate_proj and up_proj")
    _mark(layer)
    return None


class _DequantExperts:
    """Indexable like `layer.w13_weight` for `moe_forward_native`: item e is expert e's weight,
    dequantized to `dtype` on access ([2I, H] for w13: gate then up, each with its global scale;
    [H, I] for w2)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                 fused: int, dtype: torch.dtype):
        self.weight, self.scale, self.scale_2, self.dtype = weight, scale, scale_2, dtype
        rows = weight.shape[1]
        self.widths = [rows // fused] * fused

    def __getitem__(self, e: int) -> torch.Tensor:
        return dequantize(self.weight[e], self.scale[e], self.scale_2[e], self.widths, self.dtype)


class _ExpertsView:
    """What `moe_forward_native` reads of a FusedMoE layer, with dequantizing expert weights."""

    def __init__(self, layer: Any, dtype: torch.dtype):
        gated = layer.moe_runner_config.is_gated
        self.num_experts = layer.num_experts
        self.w13_weight = _DequantExperts(layer.w13_weight, layer.w13_weight_scale,
                                          layer.w13_weight_scale_2, 2 if gated else 1, dtype)
        self.w2_weight = _DequantExperts(layer.w2_weight, layer.w2_weight_scale,
                                         layer.w2_weight_scale_2, 1, dtype)
        self.w13_weight_bias = getattr(layer, "w13_weight_bias", None)
        self.w2_weight_bias = getattr(layer, "w2_weight_bias", None)


def nvfp4_moe(method: Any, layer: Any, dispatch_output: Any) -> Any:
    """SGLang's native torch MoE over the layer's NVFP4 experts (dequantized per routed expert)."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

    x = dispatch_output.hidden_states
    out = moe_forward_native(_ExpertsView(layer, x.dtype), x, dispatch_output.topk_output,
                             method.moe_runner_config)
    return StandardCombineInput(hidden_states=out)


def _around_moe_apply(original: Callable, method: Any, layer: Any, dispatch_output: Any,
                      *args: Any, **kwargs: Any):
    if not getattr(layer, MARK, False):
        return original(method, layer, dispatch_output, *args, **kwargs)
    return nvfp4_moe(method, layer, dispatch_output)
