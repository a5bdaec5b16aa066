"""FP8 KV pages: SGLang 0.5.23's per-tensor scale convention, as every Helix kernel reads it.

Store (memory_pool.MHATokenToKVPool.set_kv_buffer; the Triton backend divides the MLA latent
the same way before MLATokenToKVPool.set_kv_buffer): x / scale, cast to the fp8 dtype, no
clamp. `scale` is the layer's k_scale / v_scale (a checkpoint's per-tensor KV scale; a layer
without a KV quant method has None, i.e. 1).

Read (kernels/decode_attention.py and triton_backend.py): fp8 values are upcast inside the
kernel, k_scale is folded into the softmax scale (score = q . k8 * sm_scale * k_scale) and
v_scale multiplies the attention output (out = softmax @ v8 * v_scale). MLA's one latent is key
and value: scores use k_scale, values v_scale, as SGLang's Triton MLA decode does (equal
whenever a checkpoint carries one KV scale or none).

`dequantize` is for references and tests only: no kernel path dequantizes a whole pool.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPES = tuple(getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def check_scale(name: str, value) -> float:
    """A KV scale as a positive finite Python float (None -> 1.0)."""
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float (the layer's {name}_float), not a tensor: "
                        "reading a device tensor would sync the host on every call")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def quantize(x: torch.Tensor, dtype: torch.dtype, scale=None) -> torch.Tensor:
    """SGLang's store rounding: (x / scale).to(dtype) (scale None: a plain cast). Never in place
    (SGLang's pool divides the caller's tensor in place; the Helix paths keep it intact)."""
    if scale is not None:
        x = x / scale
    return x.to(dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x as fp32 (x.float(), exact), for the torch kernels' tiles. float8_e4m3fn on CPU goes
    through fp16 bits: torch's own CPU cast of e4m3fn is ~5x slower (measured 59 vs 12 ms for 4M
    elements, one core); e4m3fn's 4-bit exponent and 3-bit mantissa sit inside fp16's, so
    (bits & 0x7F) << 7 read as fp16 is the value x 2^-8, exactly (subnormals included); NaN (0x7F
    / 0xFF) is kept NaN. Every other dtype: x.float()."""
    if x.dtype != torch.float8_e4m3fn or x.device.type != "cpu":
        return x.float()
    bits = x.view(torch.uint8).to(torch.int16)
    magnitude = bits & 0x7F
    half = (magnitude << 7) | ((bits & 0x80) << 8)
    out = half.view(torch.float16).float().mul_(256.0)
    return out.masked_fill_(magnitude == 0x7F, float("nan"))


def dequantize(x: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x.to(dtype) * scale: the values a kernel computes with (references and tests only)."""
    out = x.to(dtype)
    return out * scale if scale != 1.0 else out
