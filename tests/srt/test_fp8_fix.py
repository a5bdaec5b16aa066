"""The CPU-engine fp8 torch path (sglang_helix.srt.cpu.fp8_fix) on SGLang's real fp8 layers.

- SGLang 0.5.23 alone cannot process an fp8 layer on this AMX-less CPU (pinned);
- through the hooks, SGLang's own `Fp8LinearMethod` (block 128 x 128 with ragged edge blocks)
  keeps the weight fp8 and its `apply` equals F.linear with the dequantized
  weight bit for bit, and the fp32 reference within bf16 rounding;
- fp8 MoE experts equal SGLang's native MoE on the dequantized experts, bit for bit;
- MLA's block-fp8 kv_b_proj: SGLang's non-CUDA requantization to one per-tensor fp8 scale
  (`block_quant_to_tensor_quant`) moves W_UK / W_UV by percents (pinned: the minimal case of that
  defect); the hook gives the exact dequantized weight in bf16, as SGLang's CUDA branch does;
- per-tensor fp8 (AutoFP8): SGLang alone stops in its requantization of fused shards (a CUDA-only
  kernel; pinned); through the hooks each shard keeps its own scale (SGLang's sm90 step,
  `convert_to_channelwise`), the fp8 weight is kept bit for bit, and `apply` equals F.linear with
  the dequantized weight bit for bit;
- compressed-tensors fp8 (srt.cpu.ct_fp8_fix): SGLang alone asks torch.cuda for a capability
  (pinned); through the hooks SGLang picks its weight-only scheme, keeps the fp8 weight and the
  channel / tensor scales, and `apply_weights` equals F.linear with the dequantized weight bit for
  bit; other compressed-tensors schemes are refused by name;
- where the hooks are installed and that they apply: tests/srt/test_hook_table.py, and
  SGLANG_CHECKS below (SGLang's own callers reach every per-tensor / compressed-tensors row).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sglang_helix.dev import fp8_models
from sglang_helix.dev.fp8_models import block_dequantize, block_quantize, quantization_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="sglang not installed")

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    import sglang.srt.layers.quantization.fp8 as sglang_fp8
    from sglang.srt.layers.linear import QKVParallelLinear, ReplicatedLinear
    from sglang.srt.layers.quantization.compressed_tensors import compressed_tensors as sglang_ct
    from sglang.srt.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_w8a16_fp8 as sglang_w8a16,
    )
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

    from sglang_helix.srt.cpu import ct_fp8_fix, fp8_fix

N, K = 320, 200  # 3 x 2 blocks of 128, the last row / column blocks ragged


def _layer(block: bool, seed: int = 0):
    """A real SGLang ReplicatedLinear with Fp8LinearMethod, loaded with a quantized random weight."""
    qc = quantization_config() if block else {"quant_method": "fp8", "activation_scheme": "dynamic"}
    layer = ReplicatedLinear(K, N, bias=False, params_dtype=torch.bfloat16,
                             quant_config=Fp8Config.from_config(qc))
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) / K ** 0.5
    if block:
        q, s = block_quantize(w)
        layer.weight.data.copy_(q)
        layer.weight_scale_inv.data.copy_(s)
        return layer, block_dequantize(q, s)
    scale = w.abs().max() / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    layer.weight.data.copy_(q)
    layer.weight_scale.data.fill_(float(scale))
    return layer, q.float() * scale


def _process(layer):
    fp8_fix._around_process(Fp8LinearMethod.process_weights_after_loading, layer.quant_method, layer)


def _apply(layer, x):
    return fp8_fix._around_linear_apply(Fp8LinearMethod.apply, layer.quant_method, layer, x)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None
                    and not fp8_fix.torch_path_wanted(), reason="this CPU has AMX")
def test_sglang_alone_needs_amx_kernels():
    layer, _ = _layer(block=True)
    with pytest.raises(AssertionError, match="requires that CPU has AMX support"):
        layer.quant_method.process_weights_after_loading(layer)


def test_fp8_linear_is_w8a16_of_the_dequantized_weight():
    layer, w_ref = _layer(block=True)
    _process(layer)
    assert layer.weight.dtype == torch.float8_e4m3fn  # stays fp8 in memory
    assert getattr(layer, fp8_fix.MARK) == ("weight",) and not layer.use_intel_amx_backend
    assert sglang_fp8._is_cpu_amx_available is False  # the module flag is restored
    assert sglang_fp8._amx_process_weight_after_loading is not fp8_fix._mark
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = _apply(layer, x)
    assert out.shape == (5, N) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, w_ref.to(torch.bfloat16)), atol=0, rtol=0)
    ref = x.float() @ w_ref.T
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- per-tensor fp8 (AutoFP8)

SHARDS = (("q", 128, 1.0), ("k", 32, 30.0), ("v", 32, 0.05))  # scales ~600x apart, as trained QKVs'


def fused_qkv(quant_config, quantize, seed: int = 0):
    """A real SGLang QKVParallelLinear (one rank: 8 query + 2 KV heads of 16 over K inputs, bf16)
    with `quant_config`'s method, each shard of SHARDS quantized by `quantize` (weight [n, K] ->
    (fp8, scale)) and loaded through SGLang's own loaders. Returns (layer, fp32 W [192, K])."""
    layer = QKVParallelLinear(K, 16, 8, 2, bias=False, quant_config=quant_config,
                              prefix="model.layers.0.self_attn.qkv_proj", parallel_group="replicated",
                              params_dtype=torch.bfloat16)
    g, parts = torch.Generator().manual_seed(seed), []
    for shard, rows, mul in SHARDS:
        q, scale = quantize(torch.randn(rows, K, generator=g) * mul / K ** 0.5)
        layer.weight.weight_loader(layer.weight, q, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, scale, shard)
        parts.append(q.float() * scale.float())
    return layer, torch.cat(parts)


def _assert_near_fp32(out, x, w_ref):
    """Within bf16 rounding of the fp32 product, per output column (shards' scales differ ~600x)."""
    ref = x.float() @ w_ref.T
    assert float(((out.float() - ref).abs().amax(0) / ref.abs().amax(0)).max()) < 2e-2


def per_tensor_qkv(seed: int = 0):
    return fused_qkv(Fp8Config.from_config(fp8_models.per_tensor_config()),
                     fp8_models.tensor_quantize, seed)


def _hook_requantize(monkeypatch):
    original = sglang_fp8.requantize_with_max_scale
    monkeypatch.setattr(sglang_fp8, "requantize_with_max_scale",
                        lambda *a, **k: fp8_fix._around_requantize(original, *a, **k))


def test_sglang_requantizes_fused_per_tensor_shards_with_a_cuda_kernel():
    layer, _ = per_tensor_qkv()
    with pytest.raises(NameError, match="sgl_per_tensor_quant_fp8"):
        _process(layer)


def test_per_tensor_shards_keep_their_own_scales_and_apply_is_w8a16(monkeypatch):
    layer, w_ref = per_tensor_qkv()
    stored = layer.weight.detach().clone()
    scales = layer.weight_scale.detach().clone()
    _hook_requantize(monkeypatch)
    _process(layer)
    assert layer.weight.dtype == torch.float8_e4m3fn and getattr(layer, fp8_fix.MARK) == ("weight",)
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))  # not requantized
    rows = torch.tensor([rows for _, rows, _ in SHARDS])
    torch.testing.assert_close(layer.weight_scale, scales.repeat_interleave(rows)[:, None],
                               atol=0, rtol=0)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = _apply(layer, x)
    torch.testing.assert_close(out, F.linear(x, w_ref.to(torch.bfloat16)), atol=0, rtol=0)
    _assert_near_fp32(out, x, w_ref)


def test_per_tensor_fused_on_disk_and_non_torch_paths_call_sglang():
    calls = []
    original = lambda *a: calls.append(a) or "sglang"  # noqa: E731
    one_scale = torch.tensor([0.5, torch.finfo(torch.float32).min])  # only the first was loaded
    assert fp8_fix._around_requantize(original, torch.zeros(4, 2), one_scale, [2, 2]) == "sglang"
    assert fp8_fix._around_requantize(original, torch.zeros(4, 2), torch.ones(2), [2, 2]) == "sglang"
    assert len(calls) == 2  # the second: outside the CPU processing of `_around_process`


# ---------------------------------------------------------------- compressed-tensors fp8


def ct_config(strategy: str, weights_type: str = "float"):
    cfg = fp8_models.compressed_tensors_config()
    cfg["config_groups"]["group_0"]["weights"].update(strategy=strategy, type=weights_type)
    cfg["config_groups"]["group_0"]["input_activations"]["type"] = weights_type
    return sglang_ct.CompressedTensorsConfig.from_config(cfg)


def ct_quantize(strategy: str):
    if strategy == "channel":
        return lambda w: fp8_models.channel_quantize(w.to(torch.bfloat16))
    return lambda w: (lambda q, s: (q, s.reshape(1)))(*fp8_models.tensor_quantize(w))


def _hook_ct_scheme(monkeypatch):
    original = sglang_ct.CompressedTensorsConfig.get_linear_scheme
    monkeypatch.setattr(sglang_ct.CompressedTensorsConfig, "get_linear_scheme",
                        lambda self, *a, **k: ct_fp8_fix._around_get_linear_scheme(original, self, *a, **k))


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None and torch.cuda.is_available(),
                    reason="a CUDA device answers the capability")
def test_sglang_alone_asks_cuda_for_a_compressed_tensors_capability():
    with pytest.raises((RuntimeError, AssertionError)):
        fused_qkv(ct_config("channel"), ct_quantize("channel"))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_is_w8a16_of_the_dequantized_weight(monkeypatch, strategy):
    _hook_ct_scheme(monkeypatch)
    layer, w_ref = fused_qkv(ct_config(strategy), ct_quantize(strategy))
    W8A16 = sglang_w8a16.CompressedTensorsW8A16Fp8
    assert type(layer.scheme) is W8A16
    ct_fp8_fix._around_w8a16_process(W8A16.process_weights_after_loading, layer.scheme, layer)
    assert sglang_w8a16.prepare_fp8_layer_for_marlin is not ct_fp8_fix._mark  # restored
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == w_ref.shape
    assert layer.weight_scale.shape == (w_ref.shape[0], 1) and getattr(layer, fp8_fix.MARK)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = ct_fp8_fix._around_w8a16_apply(W8A16.apply_weights, layer.scheme, layer, x)
    torch.testing.assert_close(out, F.linear(x, w_ref.to(torch.bfloat16)), atol=0, rtol=0)
    _assert_near_fp32(out, x, w_ref)


def test_other_compressed_tensors_schemes_are_refused_on_cpu(monkeypatch):
    _hook_ct_scheme(monkeypatch)
    with pytest.raises(fp8_fix.CpuFp8Error, match="CompressedTensorsW8A8Int8 has no CPU-engine path"):
        fused_qkv(ct_config("channel", weights_type="int"), ct_quantize("channel"))


SGLANG_CHECKS = {"fp8: SGLang's callers reach the per-tensor and compressed-tensors rows": """
import torch
import torch.nn.functional as F
import test_fp8_fix as t

x = torch.randn(3, t.K).to(torch.bfloat16)
layer, w = t.per_tensor_qkv()
layer.quant_method.process_weights_after_loading(layer)
assert torch.equal(layer.quant_method.apply(layer, x), F.linear(x, w.to(torch.bfloat16)))
for strategy in ("channel", "tensor"):
    layer, w = t.fused_qkv(t.ct_config(strategy), t.ct_quantize(strategy))
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.quant_method.apply(layer, x), F.linear(x, w.to(torch.bfloat16)))
"""}


def test_sglangs_callers_reach_the_per_tensor_and_compressed_tensors_rows(sglang_checks):
    sglang_checks.assert_ok("fp8: SGLang's callers reach the per-tensor and compressed-tensors rows")


def _kv_b_proj():
    """A block-fp8 kv_b_proj of H=4 heads x (nope 64 + v 64) rows by kv_lora_rank 192, whose two
    row blocks have scales 30x apart (as trained layers' blocks do)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 192, generator=g) / 192 ** 0.5
    w[:128] *= 30.0
    q, s = block_quantize(w)
    return q, s, block_dequantize(q, s)


def test_sglang_requantizes_kv_b_proj_lossily_on_cpu():
    from sglang.srt.layers.quantization.fp8_utils import block_quant_to_tensor_quant

    q, s, exact = _kv_b_proj()
    w, scale = block_quant_to_tensor_quant(q, s, [128, 128])
    got = w.float() * scale
    rel = ((got - exact).norm() / exact.norm()).item()
    small = ((got[128:] - exact[128:]).norm() / exact[128:].norm()).item()
    assert w.dtype == torch.float8_e4m3fn and rel > 1e-2 and small > 1e-2, (rel, small)  # ~2%: a second rounding


def test_kv_b_proj_dequantized_exactly_in_bf16():
    q, s, exact = _kv_b_proj()
    w, scale = fp8_fix.kv_b_proj_weight(q, s, [128, 128])
    assert w.dtype == torch.bfloat16 and float(scale) == 1.0
    torch.testing.assert_close(w, exact.to(torch.bfloat16), atol=0, rtol=0)
    calls = []
    fp8_fix._around_kv_b_requant(lambda *a: calls.append(a) or "sglang", q.float(), s, [128, 128])
    assert len(calls) == 1  # not fp8: SGLang's own function


def test_unmarked_layers_call_sglang():
    layer, _ = _layer(block=True)
    calls = []
    fp8_fix._around_linear_apply(lambda *a, **k: calls.append(a) or "sglang", layer.quant_method,
                                 layer, torch.zeros(1, K))
    assert len(calls) == 1


def test_fp8_moe_equals_native_moe_on_dequantized_experts():
    E, H, I, T, top = 4, 256, 128, 7, 2
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    q13, s13 = zip(*(block_quantize(w) for w in w13))
    q2, s2 = zip(*(block_quantize(w) for w in w2))
    layer = SimpleNamespace(num_experts=E, w13_weight=torch.stack(q13), w2_weight=torch.stack(q2),
                            w13_weight_scale_inv=torch.stack(s13), w2_weight_scale_inv=torch.stack(s2))
    runner = SimpleNamespace(apply_router_weight_on_input=False, activation="silu",
                             gemm1_alpha=None, gemm1_clamp_limit=None)
    method = SimpleNamespace(block_quant=True, quant_config=SimpleNamespace(weight_block_size=[128, 128]),
                             moe_runner_config=runner)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:top] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, top, generator=g).softmax(-1)
    topk = StandardTopKOutput(weights, ids, torch.zeros(T, E))
    out = fp8_fix.fp8_moe(method, layer, SimpleNamespace(hidden_states=x, topk_output=topk))
    deq = SimpleNamespace(
        num_experts=E,
        w13_weight=torch.stack([block_dequantize(a, b) for a, b in zip(q13, s13)]).to(torch.bfloat16),
        w2_weight=torch.stack([block_dequantize(a, b) for a, b in zip(q2, s2)]).to(torch.bfloat16))
    torch.testing.assert_close(out.hidden_states, moe_forward_native(deq, x, topk, runner),
                               atol=0, rtol=0)


# ---------------------------------------------------------------- fp8 KV, Helix off


def test_helix_off_fp8_kv_refuses_scales_torch_native_would_ignore():
    from sglang_helix.srt.cpu import fp8_kv_fix

    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.k_scale, model.attn.v_scale = torch.tensor(1.0), torch.tensor(-1.0)  # 1 / not loaded
    fp8_kv_fix.check_unit_kv_scales(model)
    model.attn.v_scale = torch.tensor(0.5)
    with pytest.raises(fp8_kv_fix.CpuFp8KvError, match="attn.v_scale = 0.5.*--enable-helix"):
        fp8_kv_fix.check_unit_kv_scales(model)


def test_helix_off_fp8_kv_steps_over_only_sglangs_cpu_check(monkeypatch):
    """Helix off, CPU, fp8_e4m3, torch_native, no AMX: configure sees fp8_e5m2 in its first check
    only (the real dtype is back when configure returns); anything else calls straight through."""
    from sglang_helix.srt.cpu import fp8_kv_fix
    from sglang_helix.srt.memory import hooks as mh

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setattr(fp8_kv_fix, "_torch_native_only", lambda: True)
    monkeypatch.setattr(fp8_kv_fix, "_no_amx", lambda: True)
    monkeypatch.setattr(fp8_kv_fix, "cpu_fp8_refused", lambda kvc: kvc.kv_cache_dtype == torch.float8_e4m3fn)
    seen = []
    kvc = SimpleNamespace(kv_cache_dtype=torch.float8_e4m3fn, model=torch.nn.Module(), server_args=None)
    configure = lambda k: seen.append(k.kv_cache_dtype)  # noqa: E731
    mh._around_configure(configure, kvc)  # the row's hook, Helix off: the CPU fix
    assert seen == [torch.float8_e5m2] and kvc.kv_cache_dtype == torch.float8_e4m3fn
    kvc.kv_cache_dtype = torch.bfloat16
    fp8_kv_fix.configure_helix_off(configure, kvc)
    assert seen[-1] == torch.bfloat16
    kvc.kv_cache_dtype = torch.float8_e4m3fn
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")  # off the CPU engine: SGLang's own check
    fp8_kv_fix.configure_helix_off(configure, kvc)
    assert seen[-1] == torch.float8_e4m3fn
