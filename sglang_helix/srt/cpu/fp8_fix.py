"""CPU engine: block-FP8 checkpoints without AMX, by an exact torch path.

Why: SGLang 0.5.23 serves an fp8 checkpoint on CPU only through Intel AMX kernels
(`Fp8LinearMethod` / `Fp8MoEMethod` assert "requires that CPU has AMX support", then pack weights
for `sgl_kernel.fp8_scaled_mm_cpu` / `fused_experts_cpu`, CPU builds of sgl-kernel that are not on
PyPI). On a CPU without AMX (this project's machines, CI) an fp8 DeepSeek or Llama checkpoint
cannot even start, Helix on or off.

What: SGLang's own CPU weight processing still runs (scale merging for fused shards, the
transposes its CPU path does); only the AMX step is replaced: while
`process_weights_after_loading` runs, the module's `_is_cpu_amx_available` reads True and its
`_amx_process_weight_after_loading` only marks the layer (`_helix_torch_fp8`, no packing). The
marked layers' `apply` then computes what the AMX kernels compute (weight-only fp8, "W8A16"):
the fp8 weight dequantized with SGLang's own `block_quant_dequant` (fp32 product, cast to the
activation dtype) or `weight * weight_scale` per tensor / channel, then `F.linear`; MoE experts
run SGLang's `moe_forward_native` over a view whose expert weights are dequantized one expert at
a time, only for the experts a batch routes to. Weights stay fp8 in memory.

Inert on GPU and on AMX CPUs with a real sgl-kernel: the hooks are installed only on the CPU engine
(fix "fp8-weights" of srt.cpu.fixes, rows of srt.hook_table), and every hook calls straight through unless SGLang's fp8 module runs on CPU without
AMX.

Per-tensor fp8 (`quant_method: fp8` without `weight_block_size`: AutoFP8's format, one fp32
`weight_scale` per checkpoint tensor): a fused layer (QKV, gate_up) holds one scale per shard, and
SGLang's CPU branch requantizes the shards to their largest scale (`requantize_with_max_scale`,
whose `scaled_fp8_quant` is a CUDA / XPU kernel: undefined on CPU). On GPUs with CUTLASS fp8
(sm89, sm90, sm100) SGLang does not requantize: `convert_to_channelwise` gives every output row
its shard's own scale and the fp8 weight is kept as stored (only sm120 and GPUs without CUTLASS
fp8 take the requantization). `_around_requantize` does the sm90 step on the CPU engine without
AMX, so W = fp8 * its shard's scale exactly, per row; the marked layer then runs W8A16 as above
(the GPU kernels also quantize the activations to fp8 per tensor; the CPU path, like SGLang's
AMX kernels, keeps them in the activation dtype).

MLA's W_UK / W_UV: for a block-fp8 kv_b_proj SGLang's CUDA branch dequantizes the weight to bf16
(128 x 128 blocks), but every other platform requantizes it to one per-tensor fp8 scale for
`bmm_fp8` (`block_quant_to_tensor_quant` in its DeepSeek weight loader) and its CPU branch then
multiplies back: a second rounding of every element, to a grid set by the largest block. Here
(`kv_b_proj_weight`) the CPU engine without AMX dequantizes like CUDA instead, so W_UK / W_UV are
the checkpoint's exact values in bf16; the absorbed bmm then runs in bf16 (Helix on or off).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F


FP8_MODULE = "sglang.srt.layers.quantization.fp8"
MARK = "_helix_torch_fp8"


class CpuFp8Error(RuntimeError):
    """An fp8 layout the CPU torch path does not implement (names what is missing)."""


def _fp8_module() -> Any:
    import importlib

    return importlib.import_module(FP8_MODULE)


def torch_path_wanted() -> bool:
    """True where SGLang's fp8 layers would need AMX kernels this CPU lacks."""
    mod = _fp8_module()
    return bool(mod._is_cpu) and not mod._is_cpu_amx_available


def _mark(module: Any, weight_names: list[str], *args: Any, **kwargs: Any) -> None:
    """Stands in for `_amx_process_weight_after_loading`: no packing, just remember the names."""
    module.use_intel_amx_backend = False
    setattr(module, MARK, tuple(weight_names))


@contextlib.contextmanager
def _cpu_processing_without_amx() -> Iterator[None]:
    mod = _fp8_module()
    saved = mod._is_cpu_amx_available, mod._amx_process_weight_after_loading
    mod._is_cpu_amx_available, mod._amx_process_weight_after_loading = True, _mark
    try:
        yield
    finally:
        mod._is_cpu_amx_available, mod._amx_process_weight_after_loading = saved


def _around_process(original: Callable, method: Any, layer: Any, *args: Any, **kwargs: Any):
    if not torch_path_wanted():
        return original(method, layer, *args, **kwargs)
    with _cpu_processing_without_amx():
        return original(method, layer, *args, **kwargs)


# ---------------------------------------------------------------- dense layers


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_size: list[int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight [N, K] as `dtype`: block scales through SGLang's own `block_quant_dequant`,
    else a per-tensor or per-channel (one per output row) scale."""
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant

    if block_size is not None:
        return block_quant_dequant(weight, scale, block_size, dtype)
    scale = scale.float()
    scale = scale.reshape(-1, 1) if scale.numel() == weight.shape[0] else scale.reshape(())
    return (weight.float() * scale).to(dtype)


def dequantize_weight(layer: Any, block_size: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 weight of a marked linear layer as `dtype`, [N, K] (output, input features)."""
    scale = layer.weight_scale_inv if block_size is not None else layer.weight_scale
    return dequantize(layer.weight, scale, block_size, dtype)


def fp8_linear(layer: Any, block_size: list[int] | None, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ dequant(W).T + bias -> [..., N] in x's dtype (W8A16, as the AMX kernels)."""
    if isinstance(x, tuple):
        raise CpuFp8Error("pre-quantized fp8 activations reached the CPU fp8 path; they come "
                          "from GPU-only fused kernels")
    return F.linear(x, dequantize_weight(layer, block_size, x.dtype), bias)


def _around_linear_apply(original: Callable, method: Any, layer: Any, x: Any, bias: Any = None,
                         *args: Any, **kwargs: Any):
    if getattr(layer, MARK, None) is None:
        return original(method, layer, x, bias, *args, **kwargs)
    return fp8_linear(layer, method.weight_block_size if method.block_quant else None, x, bias)


# ---------------------------------------------------------------- per-tensor fp8: fused shards


def shards_have_own_scales(weight_scale: torch.Tensor) -> bool:
    """SGLang's test in `requantize_with_max_scale`: every shard's scale was loaded (a checkpoint
    storing the fused module with one scale leaves the others at the parameter's fill value)."""
    return bool(weight_scale[-1] > torch.finfo(torch.float8_e4m3fn).min)


def channelwise_scales(weight_scale: torch.Tensor, logical_widths: list[int]) -> torch.Tensor:
    """Per-shard scales [S] of a fused per-tensor fp8 layer -> one per output row [N, 1] fp32
    (shard i's scale on its logical_widths[i] rows): SGLang's own `convert_to_channelwise`."""
    from sglang.srt.layers.quantization.utils import convert_to_channelwise

    return convert_to_channelwise(weight_scale, logical_widths)


def _around_requantize(original: Callable, weight: torch.Tensor, weight_scale: torch.Tensor,
                       logical_widths: list[int], *args: Any, **kwargs: Any):
    # only inside `_around_process`'s CPU processing (which makes the AMX flag read True)
    if _fp8_module()._amx_process_weight_after_loading is not _mark \
            or not shards_have_own_scales(weight_scale):
        return original(weight, weight_scale, logical_widths, *args, **kwargs)
    return channelwise_scales(weight_scale, logical_widths), weight


# ---------------------------------------------------------------- MLA's W_UK / W_UV


def kv_b_proj_weight(weight: torch.Tensor, scale: torch.Tensor, block_size: list[int]):
    """(W [N, K] in bf16, scale 1) from a block-fp8 kv_b_proj: what SGLang's CUDA branch does for
    128 x 128 blocks (`block_quant_dequant` to bf16, then the bf16 absorbed bmm), in place of the
    per-tensor requantization its other platforms take (`block_quant_to_tensor_quant`, for
    `bmm_fp8`): that rounds every element a second time to a grid set by the largest block and
    moved W_UK / W_UV by ~2% (relative norm) and the tiny fp8 MLA model's next-token logprobs by
    up to 4.8 nats (docs/usage.md section 4). The returned scale is the `w_scale` SGLang stores;
    its bf16 absorbed path never reads it."""
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant

    return block_quant_dequant(weight, scale, block_size, torch.bfloat16), torch.ones((), dtype=torch.float32)


def _around_kv_b_requant(original: Callable, weight: torch.Tensor, scale: torch.Tensor,
                         block_size: list[int], *args: Any, **kwargs: Any):
    if not torch_path_wanted() or weight.dtype != torch.float8_e4m3fn:
        return original(weight, scale, block_size, *args, **kwargs)
    return kv_b_proj_weight(weight, scale, block_size)


# ---------------------------------------------------------------- MoE experts


class _DequantExperts:
    """Indexable like `layer.w13_weight` for `moe_forward_native`: item e is expert e's weight,
    dequantized to `dtype` on access ([2I, H] for w13, [H, I] for w2)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None,
                 dtype: torch.dtype):
        self.weight, self.scale, self.block, self.dtype = weight, scale, block, dtype

    def __getitem__(self, e: int) -> torch.Tensor:
        return dequantize(self.weight[e], self.scale[e], self.block, self.dtype)


class _ExpertsView:
    """What `moe_forward_native` reads of a FusedMoE layer, with dequantizing expert weights."""

    def __init__(self, layer: Any, block: list[int] | None, dtype: torch.dtype):
        suffix = "_scale_inv" if block is not None else "_scale"
        self.num_experts = layer.num_experts
        self.w13_weight = _DequantExperts(layer.w13_weight, getattr(layer, "w13_weight" + suffix),
                                          block, dtype)
        self.w2_weight = _DequantExperts(layer.w2_weight, getattr(layer, "w2_weight" + suffix),
                                         block, dtype)
        self.w13_weight_bias = getattr(layer, "w13_weight_bias", None)
        self.w2_weight_bias = getattr(layer, "w2_weight_bias", None)


def fp8_moe(method: Any, layer: Any, dispatch_output: Any) -> Any:
    """SGLang's native torch MoE over the layer's fp8 experts (dequantized per routed expert)."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

    x = dispatch_output.hidden_states
    block = method.quant_config.weight_block_size if method.block_quant else None
    view = _ExpertsView(layer, block, x.dtype)
    out = moe_forward_native(view, x, dispatch_output.topk_output, method.moe_runner_config)
    return StandardCombineInput(hidden_states=out)


def _around_moe_apply(original: Callable, method: Any, layer: Any, dispatch_output: Any,
                      *args: Any, **kwargs: Any):
    if getattr(layer, MARK, None) is None:
        return original(method, layer, dispatch_output, *args, **kwargs)
    return fp8_moe(method, layer, dispatch_output)
