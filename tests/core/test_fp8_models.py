"""dev.fp8_models: the block-fp8 on-disk format of DeepSeek-V3 / Qwen3-FP8, built locally."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_helix.dev import fp8_models as fm


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_block_quantize_shapes_and_error(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = fm.block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
    assert s.dtype == torch.float32 and s.shape == (-(-n // 128), -(-k // 128))
    back = fm.block_dequantize(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the value, or one block scale's
    # subnormal step near zero
    step = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k] * 2.0 ** -9
    assert bool(((back - w).abs() <= w.abs() * 2.0 ** -4 + step).all())
    assert float(q.float().abs().max()) <= fm.FP8_MAX


def test_scale_is_per_block():
    w = torch.ones(256, 256)
    w[:128, 128:] *= 100.0  # one block 100x larger: only its scale moves
    _, s = fm.block_quantize(w)
    torch.testing.assert_close(s, torch.tensor([[1.0, 100.0], [1.0, 1.0]]) / fm.FP8_MAX)


@pytest.mark.parametrize("name, quantized", [
    ("model.layers.0.self_attn.q_b_proj.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
    ("model.layers.3.mlp.experts.2.down_proj.weight", True),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", True),
    ("model.layers.0.self_attn.qkv_proj.weight", True),
    ("model.layers.3.mlp.gate.weight", False),  # the MoE router stays unquantized
    ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
    ("model.layers.0.self_attn.q_proj.bias", False),
])
def test_which_weights_are_fp8(name, quantized):
    assert fm.is_quantized(name, 2 if name.endswith("weight") else 1) is quantized


def test_quantize_checkpoint_writes_the_real_format(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 200),
               "model.norm.weight": torch.ones(64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert fm.quantize_checkpoint(tmp_path) == 1
    t = load_file(tmp_path / "model.safetensors")
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    assert t["model.norm.weight"].dtype == torch.float32
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                          "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    assert cfg["hidden_size"] == 64


def test_fp8_kinds_shard_on_128_blocks_at_tp2():
    mla = fm.mla_fp8_config({})
    per_rank = lambda x: x // 2  # noqa: E731
    heads = 4
    for width in (per_rank(heads * (mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"])),  # q_b
                  per_rank(heads * (mla["qk_nope_head_dim"] + mla["v_head_dim"])),  # kv_b
                  per_rank(heads * mla["v_head_dim"]),  # o_proj input
                  per_rank(mla["intermediate_size"]), per_rank(mla["moe_intermediate_size"]),
                  mla["q_lora_rank"], mla["kv_lora_rank"] + mla["qk_rope_head_dim"]):
        assert width % 128 == 0
    assert mla["kv_lora_rank"] != mla["qk_nope_head_dim"]  # the realistic MLA proportions
    gqa = fm.gqa_fp8_config({})
    assert gqa["hidden_size"] == gqa["num_attention_heads"] * gqa["head_dim"]
    for width in (gqa["head_dim"], per_rank(gqa["intermediate_size"]),
                  per_rank(gqa["num_attention_heads"] * gqa["head_dim"])):
        assert width % 128 == 0


def test_dequantize_checkpoint_inverts_the_format(tmp_path):
    from safetensors.torch import load_file, save_file

    src, dst = tmp_path / "fp8", tmp_path / "fp32"
    src.mkdir()
    w = torch.randn(130, 200)
    save_file({"model.layers.0.mlp.down_proj.weight": w, "model.norm.weight": torch.ones(64)},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (src / "tokenizer.json").write_text("{}")
    fm.quantize_checkpoint(src)
    q = load_file(src / "model.safetensors")
    fm.dequantize_checkpoint(src, dst)
    t = load_file(dst / "model.safetensors")
    assert sorted(t) == ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    expect = fm.block_dequantize(q["model.layers.0.mlp.down_proj.weight"],
                                 q["model.layers.0.mlp.down_proj.weight_scale_inv"])
    torch.testing.assert_close(t["model.layers.0.mlp.down_proj.weight"], expect, atol=0, rtol=0)
    assert (t["model.layers.0.mlp.down_proj.weight"] - w).abs().max() <= w.abs().max() / 8
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["hidden_size"] == 64
    assert (dst / "tokenizer.json").read_text() == "{}"


def test_fp8_latent_sensitivity_is_zero_without_noise_and_moves_with_it(tmp_path):
    from sglang_helix.dev.tiny_models import ensure_tiny_model

    fp32 = fm.dequantize_checkpoint(ensure_tiny_model("mla-fp8", tmp_path / "cache"), tmp_path / "fp32")
    seqs, starts = [[11, 5, 9, 13, 17, 21], [12, 14, 16]], [3, 1]  # no pad id (its value is 0)
    quiet = fm.fp8_latent_sensitivity(fp32, seqs, starts, eps=0.0, seeds=2)
    assert quiet == [[0.0] * 4, [0.0] * 3]  # same rounding, same logprobs, bit for bit
    moved = fm.fp8_latent_sensitivity(fp32, seqs, starts, eps=2.0 ** -6, seeds=2)
    assert [len(m) for m in moved] == [4, 3]
    assert all(x > 0 for m in moved for x in m)


# ---------------------------------------------------------------- per-tensor and compressed-tensors


def test_tensor_quantize_is_autofp8s_arithmetic():
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(3)) * 0.02
    q, s = fm.tensor_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
    factor = fm.FP8_MAX / w.abs().max()
    assert torch.equal(q.view(torch.uint8), (w * factor).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    torch.testing.assert_close(s, factor.reciprocal(), atol=0, rtol=0)
    assert float(q.float().abs().max()) == fm.FP8_MAX  # the largest element maps to 448
    assert bool(((q.float() * s - w).abs() <= w.abs() * 2.0 ** -4 + s * 2.0 ** -9).all())


def test_channel_quantize_has_one_stored_scale_per_row():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    w[7] *= 50.0
    q, s = fm.channel_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16 and s.shape == (40, 1)
    # quantized with the scale as stored (bf16), so dequantizing with it is the checkpoint's value
    assert torch.equal(q.view(torch.uint8),
                       (w.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    back = q.float() * s.float()
    assert bool(((back - w.float()).abs() <= w.float().abs() * 2.0 ** -4 + s.float() * 2.0 ** -8).all())


@pytest.mark.parametrize("fmt, scale_shape, scale_dtype", [
    ("tensor", (), torch.float32), ("channel", (64, 1), torch.bfloat16)])
def test_quantize_checkpoint_writes_the_other_formats(tmp_path, fmt, scale_shape, scale_dtype):
    from safetensors.torch import load_file, save_file

    src, dst = tmp_path / "fp8", tmp_path / "fp32"
    src.mkdir()
    w = torch.randn(64, 200).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.down_proj.weight": w, "lm_head.weight": torch.ones(8, 64)},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert fm.quantize_checkpoint(src, fmt=fmt) == 1
    t = load_file(src / "model.safetensors")
    assert sorted(t) == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight",
                         "model.layers.0.mlp.down_proj.weight_scale"]
    scale = t["model.layers.0.mlp.down_proj.weight_scale"]
    assert scale.shape == scale_shape and scale.dtype == scale_dtype
    assert json.loads((src / "config.json").read_text())["quantization_config"] == (
        fm.per_tensor_config() if fmt == "tensor" else fm.compressed_tensors_config())
    fm.dequantize_checkpoint(src, dst)
    back = load_file(dst / "model.safetensors")
    expect = t["model.layers.0.mlp.down_proj.weight"].float() * scale.float()
    torch.testing.assert_close(back["model.layers.0.mlp.down_proj.weight"], expect, atol=0, rtol=0)
    assert sorted(back) == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight"]


def test_compressed_tensors_config_is_what_the_library_reads():
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    cfg = QuantizationConfig.model_validate(fm.compressed_tensors_config())
    group = cfg.config_groups["group_0"]
    assert cfg.quant_method == "compressed-tensors" and cfg.format == "float-quantized"
    assert cfg.ignore == ["lm_head"] and group.targets == ["Linear"]
    assert (group.weights.num_bits, group.weights.type, group.weights.strategy) == (
        8, "float", QuantizationStrategy.CHANNEL)
    assert group.input_activations.strategy == QuantizationStrategy.TOKEN
    assert group.input_activations.dynamic is True and group.weights.dynamic is False


def test_fp8_kinds_and_their_formats():
    from sglang_helix.dev import tiny_models as tm

    assert set(fm.FORMAT_KINDS) <= set(tm.KINDS) and set(fm.FORMAT_KINDS.values()) == set(fm.FORMATS)
    assert set(fm.BASE_KIND) == set(fm.FORMAT_KINDS)
    llama = tm.model_config("gqa-fp8-tensor", 9, 0, 1, 2)
    assert llama["hidden_size"] == llama["num_attention_heads"] * llama["head_dim"] == 256
    qwen = tm.model_config("qwen3-fp8-ct", 9, 0, 1, 2)
    assert qwen == tm.model_config("qwen3-fp8", 9, 0, 1, 2)  # the block kind's shape
    with pytest.raises(ValueError, match="fp8 checkpoint format"):
        fm.quantize_checkpoint("unused", fmt="int8")
