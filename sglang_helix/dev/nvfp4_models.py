"""NVFP4 tiny checkpoints in the on-disk format of NVIDIA's ModelOpt DeepSeek exports.

Format (nvidia/DeepSeek-R1-FP4 and its -v2, Kimi-K2 NVFP4; what SGLang's `ModelOptFp4Config`
reads): a quantized linear weight W [N, K] is stored as
- `<name>.weight`          uint8 [N, K/2]: two e2m1 codes per byte, element 2j in the low nibble,
                           2j+1 in the high one; a code is sign (bit 3) + magnitude index (bits 0-2)
                           into {0, 0.5, 1, 1.5, 2, 3, 4, 6};
- `<name>.weight_scale`    float8_e4m3fn [N, K/16]: one scale per 16-element group of a row;
- `<name>.weight_scale_2`  float32 scalar: the tensor's global scale, amax / (6 * 448);
- `<name>.input_scale`     float32 scalar: the static activation scale of SGLang's W4A4 GPU path;
so W = e2m1 * (float(weight_scale) * weight_scale_2), the product in that order (as SGLang's
`dequantize_nvfp4` computes it; `dequantize` here is an independent copy of that arithmetic).
config.json carries the flat ModelOpt `quantization_config` (`quant_method: modelopt`,
`quant_algo: NVFP4`, `group_size: 16`, `ignore`) and hf_quant_config.json the legacy nested one
(`quantization.exclude_modules`), as the real repositories do.

What is quantized mirrors ModelOpt's DeepSeek recipe (TensorRT-Model-Optimizer
examples/deepseek: `*attn*` quantizers disabled, `--enable_wo_quant` re-enabling o_proj, the "-v2"
checkpoints): the dense MLPs, routed and shared experts and `self_attn.o_proj` are NVFP4; the MLA
projections (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj) stay bf16 and are listed in the
exclusions, as are lm_head; embeddings, norms and the router (`mlp.gate`, not a linear layer in
DeepSeek's reference model) are not quantized. gate_proj and up_proj of one MLP share their
global scale and input scale (ModelOpt fuses their amax, SGLang fuses them into one gate_up_proj /
w13). The activation scales are 1.0 (no calibration run; SGLang's own default for a missing one):
the CPU engine's weight-only path never reads them.

The tiny kind (`"mla-nvfp4"` in dev.tiny_models) uses the 128-aligned MLA dimensions of the fp8
kind (dev.fp8_models.mla_fp8_config): at TP 2 every sharded input dimension is a multiple of 128,
past SGLang's NVFP4 loader rule (input features per partition a multiple of 16) and the 32 / 128
alignments its Blackwell kernels pad to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

GROUP = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0-7; bit 3 is the sign
PRODUCER = {"name": "modelopt", "version": "0.37.0"}
_MLA_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_SHARED_SCALE_PAIR = ("gate_proj", "up_proj")


def is_quantized(name: str, ndim: int) -> bool:
    """True for the weights ModelOpt's DeepSeek NVFP4 recipe stores as NVFP4 (see module doc)."""
    parts = name.split(".")
    if ndim != 2 or parts[-1] != "weight" or "proj" not in parts[-2]:
        return False
    return ".mlp." in name or name.endswith(".self_attn.o_proj.weight")


def excluded_modules(num_layers: int) -> list[str]:
    """The unquantized linear modules, as ModelOpt lists them (lm_head, every MLA projection)."""
    return ["lm_head"] + [f"model.layers.{i}.self_attn.{proj}"
                          for i in range(num_layers) for proj in _MLA_PROJECTIONS]


def quantization_config(num_layers: int) -> dict[str, Any]:
    """config.json's flat ModelOpt quantization_config of an NVFP4 checkpoint (KV cache not
    quantized: no kv_cache_scheme)."""
    group = {"num_bits": 4, "type": "float", "group_size": GROUP, "dynamic": False}
    return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": GROUP,
            "producer": PRODUCER, "ignore": excluded_modules(num_layers),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": group,
                                          "input_activations": group}}}


def hf_quant_config(num_layers: int) -> dict[str, Any]:
    """hf_quant_config.json (ModelOpt's legacy nested format) of the same checkpoint."""
    return {"producer": PRODUCER,
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                             "group_size": GROUP, "exclude_modules": excluded_modules(num_layers)}}


def global_scale(weight: Any) -> Any:
    """weight_scale_2 of a tensor (float32 scalar): amax / (6 * 448), as ModelOpt derives it."""
    import torch

    return (weight.float().abs().amax() / (FP4_MAX * FP8_MAX)).clamp(min=1e-12).to(torch.float32)


def quantize(weight: Any, scale_2: Any) -> tuple[Any, Any]:
    """weight [N, K] (K a multiple of 16) with global scale `scale_2` -> (packed uint8 [N, K/2],
    weight_scale float8_e4m3fn [N, K/16]): each group's scale is its amax / 6 / scale_2 in fp8,
    each element the nearest e2m1 value of w / (scale * scale_2)."""
    import torch

    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"NVFP4 needs input features divisible by {GROUP}, got {k}")
    groups = weight.float().view(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / FP4_MAX / scale_2).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    step = scale.float() * scale_2
    x = torch.where(step[..., None] > 0, groups / step[..., None].clamp(min=1e-30),
                    torch.zeros_like(groups))
    values = torch.tensor(E2M1)
    index = (x.abs()[..., None] - values).abs().argmin(-1)
    codes = (index | ((x < 0) & (index > 0)).to(torch.int64) << 3).view(n, k).to(torch.uint8)
    return (codes[:, 0::2] | codes[:, 1::2] << 4).contiguous(), scale.contiguous()


def dequantize(packed: Any, scale: Any, scale_2: Any) -> Any:
    """fp32 [..., N, K] from packed uint8 [..., N, K/2], fp8 scale [..., N, K/16] and the global
    scale: e2m1 * (float(scale) * scale_2), element 2j from the low nibble."""
    import torch

    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int64)
    step = scale.float() * scale_2.float()
    return lut[codes] * step.repeat_interleave(GROUP, dim=-1)


def _quantize_all(tensors: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of a checkpoint, the quantized ones as NVFP4 (weight, scales, input scale)."""
    import torch

    out = {}
    for name, tensor in tensors.items():
        if not is_quantized(name, tensor.dim()):
            out[name] = tensor
            continue
        prefix = name.removesuffix(".weight")  # the module, e.g. model.layers.1.mlp.experts.0.up_proj
        parent, proj = prefix.rsplit(".", 1)
        partners = [f"{parent}.{p}.weight" for p in _SHARED_SCALE_PAIR]
        shared = proj in _SHARED_SCALE_PAIR and all(p in tensors for p in partners)
        scale_2 = global_scale(torch.cat([tensors[p].flatten() for p in partners]) if shared
                               else tensor)
        out[name], out[f"{prefix}.weight_scale"] = quantize(tensor, scale_2)
        out[f"{prefix}.weight_scale_2"] = scale_2
        out[f"{prefix}.input_scale"] = torch.ones((), dtype=torch.float32)
    return out


def quantize_checkpoint(directory: str | Path) -> int:
    """Rewrite `directory`'s model.safetensors, config.json and hf_quant_config.json as an NVFP4
    checkpoint, in place. Returns the number of weights quantized."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    tensors = load_file(directory / "model.safetensors")
    out = _quantize_all(tensors)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    layers = int(config["num_hidden_layers"])
    config["quantization_config"] = quantization_config(layers)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(layers), indent=2))
    return sum(1 for name in out if name.endswith(".weight_scale_2"))


def dequantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """An fp32 copy of NVFP4 checkpoint `src` in `dst`: every NVFP4 weight replaced by its
    dequantized values (`dequantize`), scales dropped, no quantization config; tokenizer and other
    files copied. The fp32 reference of the NVFP4 weights (transformers loads it on CPU)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in ("model.safetensors", "config.json",
                                                "hf_quant_config.json"):
            shutil.copy2(item, dst / item.name)
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        if tensor.dtype == torch.uint8:
            prefix = name.removesuffix(".weight")
            tensor = dequantize(tensor, tensors[f"{prefix}.weight_scale"],
                                tensors[f"{prefix}.weight_scale_2"])
        out[name] = tensor.float().contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dst
