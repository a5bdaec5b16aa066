"""CPU engine: compressed-tensors FP8 checkpoints, by SGLang's own weight-only scheme and torch.

Why: the FP8 Llama / Qwen checkpoints most people serve are compressed-tensors ones
(llm-compressor's "FP8-dynamic": `quant_method: compressed-tensors`, `format: float-quantized`,
fp8 weights with one scale per output channel, activations quantized per token at run time).
SGLang 0.5.23 picks their scheme by asking the CUDA device's compute capability
(`CompressedTensorsConfig._check_scheme_supported` -> `torch.cuda.get_device_capability`), which
dies on the CPU engine ("Found no NVIDIA driver"), AMX or not, Helix on or off.

What: a CPU has no fp8 activation GEMM, so on the CPU engine the capability question answers
"not supported" and SGLang picks the scheme it picks on GPUs below sm89 for the same checkpoint:
`CompressedTensorsW8A16Fp8`, weight-only fp8 (the input-activation spec, dynamic per token or
static, is not applied: SGLang's note "will be ignored during inference post loading"). Its own
weight processing runs (a per-tensor scale per shard expanded to every row of its shard by
`convert_to_channelwise`, per-channel scales kept as stored; no requantization), with only the
Marlin packing step replaced by a marker; a marked layer's `apply_weights` is
`F.linear(x, dequant(W))`, W = fp8 * scale per output row cast to the activation dtype: the
CPU fp8 path of srt.cpu.fp8_fix. Weights stay fp8 in memory. Any other compressed-tensors scheme
(int8, fp4, int4 Marlin, block fp8, ...) is refused on the CPU engine with its name, at load.

Inert off the CPU engine: its hooks (fix "fp8-compressed-tensors" of srt.cpu.fixes, rows of
srt.hook_table) are installed only there, and each calls straight through unless SGLang runs on
CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from .fp8_fix import MARK, CpuFp8Error, fp8_linear

W8A16_MODULE = "sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a16_fp8"


def _on_cpu() -> bool:
    from sglang.srt.utils import is_cpu

    return bool(is_cpu())


def cpu_capability(min_capability: int, error: bool = True) -> bool:
    """`_check_scheme_supported` of a CPU: the choices between a scheme and its fallback
    (error=False) answer False, so SGLang falls back to its weight-only schemes; the final check of
    the chosen scheme (error=True) passes, and `_around_get_linear_scheme` checks its type."""
    return error


@contextlib.contextmanager
def _capability_of_a_cpu(config: Any) -> Iterator[None]:
    config._check_scheme_supported = cpu_capability  # instance attribute: this config only
    try:
        yield
    finally:
        del config._check_scheme_supported


def _around_get_linear_scheme(original: Callable, config: Any, *args: Any, **kwargs: Any):
    if not _on_cpu():
        return original(config, *args, **kwargs)
    with _capability_of_a_cpu(config):
        scheme = original(config, *args, **kwargs)
    w8a16 = _w8a16_module().CompressedTensorsW8A16Fp8
    if scheme is not None and not isinstance(scheme, w8a16):
        raise CpuFp8Error(
            f"compressed-tensors scheme {type(scheme).__name__} has no CPU-engine path: the CPU "
            f"engine serves compressed-tensors fp8 weights (channel or tensor scales) as "
            f"{w8a16.__name__}; serve this checkpoint on GPU")
    return scheme


def _w8a16_module() -> Any:
    import importlib

    return importlib.import_module(W8A16_MODULE)


def _mark(layer: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for `prepare_fp8_layer_for_marlin`: the weight back to [N, K] (SGLang transposed
    it for Marlin), no packing, the layer marked for the torch path."""
    from torch.nn import Parameter

    layer.weight = Parameter(layer.weight.data.t().contiguous(), requires_grad=False)
    setattr(layer, MARK, ("weight",))


@contextlib.contextmanager
def _without_marlin() -> Iterator[None]:
    mod = _w8a16_module()
    saved = mod.prepare_fp8_layer_for_marlin
    mod.prepare_fp8_layer_for_marlin = _mark
    try:
        yield
    finally:
        mod.prepare_fp8_layer_for_marlin = saved


def _around_w8a16_process(original: Callable, scheme: Any, layer: Any, *args: Any, **kwargs: Any):
    if not _on_cpu():
        return original(scheme, layer, *args, **kwargs)
    with _without_marlin():
        return original(scheme, layer, *args, **kwargs)


def _around_w8a16_apply(original: Callable, scheme: Any, layer: Any, x: Any, bias: Any = None,
                        *args: Any, **kwargs: Any):
    if getattr(layer, MARK, None) is None:
        return original(scheme, layer, x, bias, *args, **kwargs)
    return fp8_linear(layer, None, x, bias)
