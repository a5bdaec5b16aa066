"""The CPU-engine NVFP4 path (sglang_helix.srt.cpu.nvfp4_fix) on SGLang's real ModelOpt layers.

- the dequantization is bit-exact against an independent reference built from the on-disk tensors
  of the tiny NVFP4 checkpoint (dev.nvfp4_models.dequantize: the e2m1 table, the nibble order,
  fp8 group scale x global scale), every quantized tensor of it, and per fused partition;
- SGLang 0.5.23 alone cannot process an NVFP4 linear layer or build the NVFP4 MoE method on CPU
  (pinned); through the hooks its own `ModelOptFp4LinearMethod` keeps the packed weight and its
  `apply` equals F.linear with the dequantized weight bit for bit;
- NVFP4 MoE experts equal SGLang's native MoE on the dequantized experts, bit for bit, gate and
  up halves with their own global scales;
- the routed scaling factor is not folded into the top-k weights for the CPU experts;
- where the hooks are installed and that they apply: tests/srt/test_hook_table.py.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sglang_helix.dev import nvfp4_models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang.srt.layers.linear import ReplicatedLinear
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.quantization.modelopt_quant import (
        ModelOptFp4Config,
        ModelOptFp4LinearMethod,
        ModelOptNvFp4FusedMoEMethod,
    )

    from sglang_helix.srt.cpu import nvfp4_fix

N, K = 96, 160  # 10 groups of 16 per row


def _quantized(n: int, k: int, seed: int):
    """(packed, scale, global scale, fp32 reference) of a random [n, k] weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    scale_2 = nvfp4_models.global_scale(w)
    packed, scale = nvfp4_models.quantize(w, scale_2)
    return packed, scale, scale_2, nvfp4_models.dequantize(packed, scale, scale_2)


def _config():
    cfg = ModelOptFp4Config.from_config(nvfp4_models.quantization_config(1))
    cfg.packed_modules_mapping = {}  # set by the model class at load time
    return cfg


def _layer(seed: int = 0):
    """A real SGLang ReplicatedLinear with ModelOptFp4LinearMethod, loaded with an NVFP4 weight."""
    layer = ReplicatedLinear(K, N, bias=False, params_dtype=torch.bfloat16, quant_config=_config(),
                             prefix="model.layers.0.mlp.down_proj")
    packed, scale, scale_2, ref = _quantized(N, K, seed)
    layer.weight.data.copy_(packed)
    layer.weight_scale.data.copy_(scale)
    layer.weight_scale_2.data.fill_(float(scale_2))
    return layer, ref


def test_quantize_round_trips_within_fp4_and_keeps_the_on_disk_layout():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(9))
    packed, scale, scale_2, ref = _quantized(N, K, 9)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (N, K // 16)
    assert scale_2.dtype == torch.float32 and scale_2.dim() == 0
    w = w / K ** 0.5
    assert float((ref - w).norm() / w.norm()) < 0.15  # e2m1 with 16-element groups: ~10%
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)  # element 2j: low nibble
    magnitudes = torch.tensor(nvfp4_models.E2M1)[(codes & 7).long()]
    signs = 1 - 2 * (codes >> 3).float()
    step = (scale.float() * scale_2).repeat_interleave(16, -1)
    assert torch.equal(ref, magnitudes * signs * step)


def test_dequantization_is_bit_exact_on_the_tiny_checkpoints_tensors(tmp_path):
    """Every NVFP4 tensor of the tiny checkpoint, through the CPU path's SGLang dequantization,
    equals the reference built from the on-disk tensors (bf16 as the server runs it, and fp32)."""
    from safetensors.torch import load_file

    from sglang_helix.dev.tiny_models import build_tiny_model

    path = build_tiny_model("mla-nvfp4", tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    names = [n for n, t in tensors.items() if t.dtype == torch.uint8]
    assert len(names) == 3 + 3 + 2 * (4 * 3 + 3)  # o_proj x3, dense MLP, 2 x (4 experts + shared)
    for name in names:
        prefix = name.removesuffix(".weight")
        scale, scale_2 = tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_scale_2"]
        ref = nvfp4_models.dequantize(tensors[name], scale, scale_2)
        for dtype in (torch.float32, torch.bfloat16):
            got = nvfp4_fix.dequantize(tensors[name], scale, scale_2.reshape(1), [ref.shape[0]], dtype)
            assert torch.equal(got, ref.to(dtype)), name


def test_fused_partitions_take_their_own_global_scale():
    """gate_up_proj (and w13): rows of partition i are dequantized with weight_scale_2[i]."""
    parts = [_quantized(32, K, s) for s in (1, 2)]
    packed = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    scale_2 = torch.stack([p[2] for p in parts])
    got = nvfp4_fix.dequantize(packed, scale, scale_2, [32, 32], torch.float32)
    assert torch.equal(got, torch.cat([p[3] for p in parts]))
    with pytest.raises(nvfp4_fix.CpuNvfp4Error, match="2 global scales for 3 fused partitions"):
        nvfp4_fix.dequantize(packed, scale, scale_2, [16, 16, 32], torch.float32)


def test_sglang_alone_cannot_serve_nvfp4_on_cpu():
    layer, _ = _layer()
    with pytest.raises(ValueError, match="require SM100"):
        layer.quant_method.process_weights_after_loading(layer)
    with pytest.raises(ValueError, match="does not support NVFP4"):
        ModelOptNvFp4FusedMoEMethod(_config())


def test_nvfp4_linear_is_w4a16_of_the_dequantized_weight():
    layer, ref = _layer()
    nvfp4_fix._around_linear_process(ModelOptFp4LinearMethod.process_weights_after_loading,
                                     layer.quant_method, layer)
    assert getattr(layer, nvfp4_fix.MARK) and layer.weight.dtype == torch.uint8  # stays packed
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = nvfp4_fix._around_linear_apply(ModelOptFp4LinearMethod.apply, layer.quant_method, layer, x)
    assert out.shape == (5, N) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, ref.to(torch.bfloat16)), atol=0, rtol=0)


def test_unmarked_layers_call_sglang():
    layer, _ = _layer()
    calls = []
    nvfp4_fix._around_linear_apply(lambda *a, **k: calls.append(a) or "sglang", layer.quant_method,
                                   layer, torch.zeros(1, K))
    on_gpu = SimpleNamespace(weight=torch.empty(N, K // 2, dtype=torch.uint8, device="meta"))
    nvfp4_fix._around_linear_process(lambda *a, **k: calls.append(a), layer.quant_method, on_gpu)
    assert len(calls) == 2 and not hasattr(on_gpu, nvfp4_fix.MARK)  # off the CPU: SGLang's own


def test_moe_method_built_on_cpu_and_runs_no_cuda_runner():
    method = ModelOptNvFp4FusedMoEMethod.__new__(ModelOptNvFp4FusedMoEMethod)
    nvfp4_fix._around_moe_init(ModelOptNvFp4FusedMoEMethod.__init__, method, _config())
    from sglang.srt.layers.quantization import modelopt_quant

    assert not modelopt_quant.get_platform().is_blackwell  # the module's platform is restored
    layer = SimpleNamespace(w13_weight=torch.zeros(1, 2, 8, dtype=torch.uint8))
    runner_config = SimpleNamespace(is_gated=True)
    nvfp4_fix._around_moe_runner(lambda *a: pytest.fail("CUDA runner"), method, layer, runner_config)
    assert method.runner is None and method.moe_runner_config is runner_config
    assert method.get_moe_runner_backend(layer) is None
    assert nvfp4_fix._around_fuses_scaling(lambda *a: True, method, None) is False
    other = SimpleNamespace()
    assert nvfp4_fix._around_fuses_scaling(lambda *a: "sglang", other, None) == "sglang"


def test_nvfp4_moe_equals_native_moe_on_dequantized_experts():
    E, H, I, T, top = 4, 128, 64, 7, 2
    g = torch.Generator().manual_seed(3)
    gate, up, down = ([_quantized(r, c, int(torch.randint(1 << 30, (1,), generator=g)))
                       for _ in range(E)] for r, c in ((I, H), (I, H), (H, I)))
    layer = SimpleNamespace(
        num_experts=E, moe_runner_config=SimpleNamespace(is_gated=True),
        w13_weight=torch.stack([torch.cat([a[0], b[0]]) for a, b in zip(gate, up)]),
        w13_weight_scale=torch.stack([torch.cat([a[1], b[1]]) for a, b in zip(gate, up)]),
        w13_weight_scale_2=torch.stack([torch.stack([a[2], b[2]]) for a, b in zip(gate, up)]),
        w2_weight=torch.stack([d[0] for d in down]), w2_weight_scale=torch.stack([d[1] for d in down]),
        w2_weight_scale_2=torch.stack([d[2] for d in down]))
    assert layer.w13_weight_scale_2.shape == (E, 2) and not torch.equal(*layer.w13_weight_scale_2.T)
    runner = SimpleNamespace(apply_router_weight_on_input=False, activation="silu",
                             gemm1_alpha=None, gemm1_clamp_limit=None)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:top] for _ in range(T)]).to(torch.int32)
    topk = StandardTopKOutput(torch.rand(T, top, generator=g).softmax(-1), ids, torch.zeros(T, E))
    out = nvfp4_fix.nvfp4_moe(SimpleNamespace(moe_runner_config=runner), layer,
                              SimpleNamespace(hidden_states=x, topk_output=topk))
    deq = SimpleNamespace(
        num_experts=E,
        w13_weight=torch.stack([torch.cat([a[3], b[3]]) for a, b in zip(gate, up)]).to(torch.bfloat16),
        w2_weight=torch.stack([d[3] for d in down]).to(torch.bfloat16))
    torch.testing.assert_close(out.hidden_states, moe_forward_native(deq, x, topk, runner),
                               atol=0, rtol=0)
