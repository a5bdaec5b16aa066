"""FP8 tiny checkpoints in the on-disk formats of real FP8 checkpoints (FORMATS).

"block", DeepSeek-V3 / Qwen3-FP8 (what SGLang's `Fp8Config` reads): every linear weight of the
attention and MLP / expert layers is stored as float8_e4m3fn [N, K] with a float32
`<name>_scale_inv` of shape [ceil(N / bn), ceil(K / bk)] (W ~= fp8 * scale_inv, one scale per
bn x bk block), and config.json carries `quantization_config = {"quant_method": "fp8", "fmt":
"e4m3", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}`. Embeddings, norms, the
MoE router (`mlp.gate`) and lm_head stay unquantized, as in the real checkpoints (all formats).

"tensor", AutoFP8's per-tensor format (many FP8 Llama / Qwen checkpoints): the same weights in
fp8, each with a 0-dim float32 `weight_scale` (`q_proj.weight_scale`; W ~= fp8 * scale, scale =
amax / 448 as AutoFP8 computes it), `quantization_config = {"quant_method": "fp8",
"activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}`.

"channel", compressed-tensors FP8-dynamic (llm-compressor; e.g. the RedHatAI / neuralmagic
"-FP8-dynamic" Llama / Qwen checkpoints): fp8 weights with a `weight_scale` [N, 1] per output
channel in the model's dtype (bf16 here, as llm-compressor stores it), and a `quantization_config`
with `quant_method: compressed-tensors`, `format: float-quantized`, one config group targeting
`Linear` (weights: 8-bit float, channel, static; input_activations: 8-bit float, token, dynamic),
`ignore: ["lm_head"]`.

The tiny kinds (FORMAT_KINDS): `"mla-fp8"`, `"qwen3-fp8"` in the "block" format, the Llama
`"gqa-fp8-tensor"` in the "tensor" one and `"qwen3-fp8-ct"` in the "channel" one, each larger than
its base kind so that greedy margins are wide enough to check against a reference (a quarter of
the e2e steps above 1 nat) while bf16 moves logprobs by well under a nat. A Llama, without Qwen3's
q/k norms, gets more sensitive as it grows (at Qwen3's size below, bf16 moved its top-5 logprobs
by up to 2.3 nats with Helix off at TP 1, on the 2-core dev VM), so it stays smaller: hidden 256,
8 query heads, 2 KV heads, head_dim 32, 2 layers, intermediate 512. Every sharded dimension of
the others is a multiple of 128 at TP 2, so SGLang's block-quant shape rules accept the real
128 x 128 blocks: MLA hidden 128, q_lora_rank 128, kv_lora_rank 192 (!= qk_nope_head_dim 64),
rope 64, v_head_dim 64, 4 heads, dense / expert intermediate 256; Qwen3 hidden 512 (= H x D),
4 query heads, 2 KV heads, head_dim 128, intermediate 512.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FORMATS = ("block", "tensor", "channel")
# the fp8 tiny kinds of dev.tiny_models: their format, and the kind whose config they resize
FORMAT_KINDS = {"mla-fp8": "block", "qwen3-fp8": "block", "gqa-fp8-tensor": "tensor",
                "qwen3-fp8-ct": "channel"}
BASE_KIND = {"mla-fp8": "mla", "qwen3-fp8": "qwen3", "gqa-fp8-tensor": "gqa", "qwen3-fp8-ct": "qwen3"}


def mla_fp8_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiny MLA + MoE config with 128-aligned dimensions (see the module docstring)."""
    return {**cfg, "hidden_size": 128, "intermediate_size": 256, "q_lora_rank": 128,
            "kv_lora_rank": 192, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64,
            "v_head_dim": 64, "head_dim": 64, "moe_intermediate_size": 256}


def gqa_fp8_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiny GQA (Qwen3) config with 128-aligned dimensions (see the module docstring).

    Qwen3, not Llama: SGLang 0.5.23's Llama loader renames `weight_scale_inv` to `weight_scale`
    and so drops every block scale of a block-fp8 Llama checkpoint (Helix off too)."""
    return {**cfg, "hidden_size": 512, "intermediate_size": 512, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128}


def llama_fp8_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiny Llama config of the per-tensor kind (see the module docstring)."""
    return {**cfg, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}


def fp8_kind_config(kind: str, base: dict[str, Any]) -> dict[str, Any]:
    """The config of fp8 tiny kind `kind` from its base kind's (BASE_KIND), resized as the module
    docstring says."""
    resize = {"mla": mla_fp8_config, "gqa": llama_fp8_config}.get(BASE_KIND[kind], gqa_fp8_config)
    return resize(base)


def quantization_config(block: tuple[int, int] = BLOCK) -> dict[str, Any]:
    """config.json's quantization_config of a block-fp8 checkpoint (DeepSeek-V3's keys)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}


def per_tensor_config() -> dict[str, Any]:
    """config.json's quantization_config of an AutoFP8 per-tensor checkpoint (dynamic activations)."""
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}


def _ct_args(strategy: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
            "dynamic": dynamic, "group_size": None, "block_structure": None, "actorder": None,
            "observer": observer, "observer_kwargs": {}}


def compressed_tensors_config() -> dict[str, Any]:
    """config.json's quantization_config of a compressed-tensors FP8-dynamic checkpoint."""
    group = {"targets": ["Linear"], "weights": _ct_args("channel", False, "minmax"),
             "input_activations": _ct_args("token", True, None), "output_activations": None,
             "format": "float-quantized"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def is_quantized(name: str, ndim: int) -> bool:
    """True for the linear weights a block-fp8 checkpoint stores in fp8."""
    parts = name.split(".")
    if ndim != 2 or parts[-1] != "weight" or "proj" not in parts[-2]:
        return False
    return ".self_attn." in name or ".mlp." in name


def block_quantize(weight: Any, block: tuple[int, int] = BLOCK) -> tuple[Any, Any]:
    """weight [N, K] -> (fp8 [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)]), W ~= q * s."""
    import torch

    bn, bk = block
    n, k = weight.shape
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    tiles = padded.view(rows, bn, cols, bk)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rows, cols]
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * bn, cols * bk)[:n, :k].contiguous(), scale.contiguous()


def block_dequantize(q: Any, scale: Any, block: tuple[int, int] = BLOCK) -> Any:
    """Inverse of block_quantize up to fp8 rounding: fp32 [N, K]."""
    bn, bk = block
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def tensor_quantize(weight: Any) -> tuple[Any, Any]:
    """weight [N, K] -> (fp8 [N, K], 0-dim fp32 scale), W ~= q * scale; AutoFP8's arithmetic
    (multiply by 448 / amax, clamp, cast; the scale is the reciprocal of that factor)."""
    import torch

    w = weight.float()
    factor = FP8_MAX / w.abs().max().clamp(min=1e-12)
    q = (w * factor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, factor.reciprocal()


def channel_quantize(weight: Any) -> tuple[Any, Any]:
    """weight [N, K] -> (fp8 [N, K], scale [N, 1] in weight's dtype), W ~= q * scale: one scale
    per output row (amax / 448, stored in the model's dtype as llm-compressor does; the fp8
    values are quantized with the stored scale)."""
    import torch

    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX).to(weight.dtype)
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _quantize_one(name: str, tensor: Any, fmt: str, block: tuple[int, int]) -> dict[str, Any]:
    if fmt == "block":
        q, s = block_quantize(tensor, block)
        return {name: q, f"{name}_scale_inv": s}
    q, s = tensor_quantize(tensor) if fmt == "tensor" else channel_quantize(tensor)
    return {name: q, f"{name}_scale": s}


def _format_config(fmt: str, block: tuple[int, int]) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown fp8 checkpoint format {fmt!r}; choose one of {FORMATS}")
    return {"block": lambda: quantization_config(block), "tensor": per_tensor_config,
            "channel": compressed_tensors_config}[fmt]()


def quantize_checkpoint(directory: str | Path, block: tuple[int, int] = BLOCK,
                        fmt: str = "block") -> int:
    """Rewrite `directory`'s model.safetensors and config.json as an fp8 checkpoint of format
    `fmt` (FORMATS; `block` sizes the "block" format's blocks), in place.

    Returns the number of weights quantized.
    """
    from safetensors.torch import load_file, save_file

    quantization = _format_config(fmt, block)
    directory = Path(directory)
    tensors = load_file(directory / "model.safetensors")
    out, count = {}, 0
    for name, tensor in tensors.items():
        if is_quantized(name, tensor.dim()):
            out.update(_quantize_one(name, tensor, fmt, block))
            count += 1
        else:
            out[name] = tensor
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return count


def _fp8_cache(noise_rel: float = 0.0, seed: int = 0):
    """A transformers DynamicCache that rounds every key/value it keeps and returns through
    float8_e4m3fn, as SGLang's fp8 KV pool holds them; with noise_rel, each element is first
    scaled by (1 + noise_rel * N(0, 1)): fp32 summation-order differences, made visible."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)

    def rnd(x):
        if noise_rel:
            x = x * (1 + noise_rel * torch.randn(x.shape, generator=gen, dtype=x.dtype))
        return x.to(torch.float8_e4m3fn).to(x.dtype)

    class Fp8Cache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(rnd(key_states), rnd(value_states), layer_idx, *args, **kwargs)

    return Fp8Cache


def fp32_model(path):
    """transformers loads the checkpoint at `path` in fp32 on CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def fp8_kv_reference_greedy(path, prompts, max_new_tokens: int) -> list[SimpleNamespace]:
    """transformers fp32 greedy, full recomputation per step, with the KV cache rounded through
    float8_e4m3fn where SGLang stores it (every token's key/value, the current ones included, as
    SGLang's pool holds them). Each result carries `envelope`: see fp8_kv_rounding_envelope."""
    import torch

    model, cache = fp32_model(path), _fp8_cache()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, tokens, logprobs, margin = list(prompt), [], [], float("inf")
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids]), past_key_values=cache(config=model.config),
                               use_cache=True).logits[0, -1].float()
                top2 = torch.topk(logits, 2)
                token = int(top2.indices[0])
                margin = min(margin, float(top2.values[0] - top2.values[1]))
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                tokens.append(token)
                ids.append(token)
            out.append(SimpleNamespace(tokens=tokens, logprobs=logprobs, min_margin=margin))
    for ref, envelope in zip(out, fp8_kv_rounding_envelope(model, prompts, out)):
        ref.envelope = envelope
    return out


def fp8_kv_rounding_envelope(model, prompts, refs, *, seeds: int = 8, noise_rel: float = 3e-6) -> list[float]:
    """Per prompt: the largest move of any logprob along its reference's tokens when the K/V
    elements get relative noise noise_rel before the fp8 rounding (`seeds` draws). A server
    computes K/V with other fp32 summation orders than transformers; the few elements that sit on
    an fp8 rounding midpoint then round the other way, and one e4m3 step is 6-12% of an element.
    On tiny random models that moves logprobs by up to ~5e-2: a fixed tolerance is either flaky
    or blind, so each prompt's tolerance and decisiveness come from its own envelope."""
    import torch

    envelopes = []
    with torch.no_grad():
        for prompt, ref in zip(prompts, refs):
            ids = torch.tensor([[*prompt, *ref.tokens[:-1]]])
            positions = range(len(prompt) - 1, ids.shape[1])
            worst = 0.0
            for seed in range(seeds):
                cache = _fp8_cache(noise_rel, seed)(config=model.config)
                logp = torch.log_softmax(model(ids, past_key_values=cache, use_cache=True).logits[0].float(), -1)
                moved = [abs(float(logp[pos, tok]) - lp) for pos, tok, lp in zip(positions, ref.tokens, ref.logprobs)]
                worst = max(worst, *moved)
            envelopes.append(worst)
    return envelopes


def dequantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """An fp32 copy of fp8 checkpoint `src` (any of FORMATS) in `dst`: every fp8 weight replaced
    by fp8 * its scale (block `_scale_inv`, per-tensor or per-channel `_scale`), no
    quantization_config; tokenizer and other files copied. transformers loads it on CPU (its fp8
    loaders need a GPU): the fp32 reference of the fp8 weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in ("model.safetensors", "config.json"):
            shutil.copy2(item, dst / item.name)
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("_scale_inv", "_scale")):
            continue
        if tensor.dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in tensors:
            tensor = block_dequantize(tensor, tensors[f"{name}_scale_inv"])
        elif tensor.dtype == torch.float8_e4m3fn:
            tensor = tensor.float() * tensors[f"{name}_scale"].float()  # 0-dim or [N, 1]
        out[name] = tensor.float().contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dst


def logprobs_along(path, prompts, continuations) -> list[Any]:
    """transformers fp32 next-token log-probabilities along given continuations (teacher forced):
    for prompt i and its continuation c, [len(c), vocab] where row s is the distribution the
    model gives for token s of c after prompt + c[:s]. One forward per prompt, no cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for prompt, cont in zip(prompts, continuations, strict=True):
            logits = model(torch.tensor([list(prompt) + list(cont)])).logits[0].float()
            out.append(torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(cont)], -1))
    return out


def fp8_latent_sensitivity(path, sequences, starts, *, eps: float = 2.0 ** -9, seeds: int = 4,
                           top: int = 5, fp8_latent: bool = True) -> list[list[float]]:
    """How far bf16-sized noise moves an MLA model's next-token logprobs once its KV latent is
    rounded through float8_e4m3fn (as fp8 KV pages store it).

    transformers fp32 on the unquantized checkpoint `path` (dequantize_checkpoint), the output of
    every kv_a_layernorm (the latent) rounded through fp8; each attention output (o_proj's input)
    multiplied by 1 + eps * N(0, 1) per element, `seeds` times. sequences[i]: token ids; returns,
    per sequence, for each position p >= starts[i] - 1, the largest move of the noiseless top-`top`
    next-token logprobs. Two correct implementations whose attention rounds differently (one rank
    vs a KV-sharded merge, in bf16) can disagree by about this much at that position.
    fp8_latent=False: the latent is not rounded (bf16-sized noise alone, as with bf16 KV pages).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    noise = {"eps": 0.0}
    for layer in model.model.layers:
        if fp8_latent:
            layer.self_attn.kv_a_layernorm.register_forward_hook(
                lambda mod, inp, out: out.to(torch.float8_e4m3fn).to(out.dtype))
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args: (args[0] * (1 + noise["eps"] * torch.randn_like(args[0])),))
    result = []
    with torch.no_grad():
        for ids, start in zip(sequences, starts):
            def logprobs():
                return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, start - 1:], -1)

            noise["eps"] = 0.0
            base = logprobs()
            keep = base.topk(top, dim=-1).indices
            worst = torch.zeros(keep.shape[0])
            noise["eps"] = eps
            for seed in range(seeds):
                torch.manual_seed(seed)
                moved = (logprobs() - base).gather(1, keep).abs().amax(-1)
                worst = torch.maximum(worst, moved)
            result.append(worst.tolist())
    return result
