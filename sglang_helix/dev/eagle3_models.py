"""Tiny EAGLE-3 draft models for a tiny Llama target, in the on-disk format of real EAGLE-3 drafts.

A real EAGLE-3 Llama draft (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, SGLang's own EAGLE-3 test
drafts) is a directory with its own config.json: `architectures: ["LlamaForCausalLMEagle3"]`,
`model_type: "llama"`, one decoder layer (`num_hidden_layers: 1`) with the target's attention dims,
`vocab_size` (the target's) and `draft_vocab_size` (the smaller vocabulary the draft predicts in),
`tie_word_embeddings: false`, and `eagle_config.eagle_aux_hidden_state_layer_ids` (the target layers
whose hidden states it reads; SGLang captures the input of layer id + 1). Its tensors:

- `fc.weight` [H, 3H]: the three captured target hidden states, concatenated, projected to H;
- `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight` [H];
- `midlayer.self_attn.{q,k,v}_proj.weight` [heads * D, 2H] (input: the normed token embedding and
  the normed hidden state, concatenated), `midlayer.self_attn.o_proj.weight` [H, heads * D];
- `midlayer.mlp.{gate,up,down}_proj.weight`; `norm.weight` [H];
- `lm_head.weight` [draft_vocab_size, H];
- `d2t` [draft_vocab_size] int64 (target id - draft id of each draft token) and `t2d` [vocab] bool
  (which target tokens the draft vocabulary holds).
No embedding: the draft reads the target's (SGLang's `set_embed`). SGLang 0.5.23 loads exactly these
(`models/llama_eagle3.py`: `midlayer` -> `layers.0`, `d2t` -> its hot-token map, `t2d` skipped).

The draft here is trained for a few seconds on CPU (`eagle3_training`, which also caches it) to
predict the target's own greedy next-next token from its captured hidden states, so it drafts
tokens the target accepts (random weights would almost never be accepted). `draft_forward` is the
draft's computation as SGLang runs it (the training forward and a reference for tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUILDER_VERSION = 1
ARCHITECTURE = "LlamaForCausalLMEagle3"
DRAFT_VOCAB = 256  # of the tiny target's 384 tokens: the vocab maps are real
AUX_LAYER_IDS = (0, 1, 2)  # captured: inputs of target layers 1, 2, 3 (of 4)


def eagle3_config(target: dict[str, Any], draft_vocab_size: int = DRAFT_VOCAB,
                  aux_layer_ids: tuple[int, ...] = AUX_LAYER_IDS) -> dict[str, Any]:
    """The draft's config.json for a Llama `target` config (its attention dims, its vocabulary)."""
    if draft_vocab_size > target["vocab_size"]:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} > the target's vocab_size "
                         f"{target['vocab_size']}")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "vocab_size",
            "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters")
    return {
        **{k: target[k] for k in keys if k in target},
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "draft_vocab_size": draft_vocab_size, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "rope_theta": target.get("rope_parameters", {}).get("rope_theta", 10000.0),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
                         "use_aux_hidden_state": True},
    }


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every float tensor of the on-disk draft (d2t / t2d apart)."""
    h, d = cfg["hidden_size"], cfg["head_dim"]
    q, kv, ff = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d, cfg["intermediate_size"]
    aux = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    m = "midlayer."
    return {
        "fc.weight": (h, aux * h),
        m + "input_layernorm.weight": (h,), m + "hidden_norm.weight": (h,),
        m + "post_attention_layernorm.weight": (h,),
        m + "self_attn.q_proj.weight": (q, 2 * h), m + "self_attn.k_proj.weight": (kv, 2 * h),
        m + "self_attn.v_proj.weight": (kv, 2 * h), m + "self_attn.o_proj.weight": (h, q),
        m + "mlp.gate_proj.weight": (ff, h), m + "mlp.up_proj.weight": (ff, h),
        m + "mlp.down_proj.weight": (h, ff),
        "norm.weight": (h,), "lm_head.weight": (cfg["draft_vocab_size"], h),
    }


def init_weights(cfg: dict[str, Any], seed: int, init_range: float) -> dict[str, Any]:
    """Seeded random float tensors (norm weights 1), trainable."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * init_range
        out[name] = t.requires_grad_()
    return out


def vocab_maps(hot_ids: list[int], vocab_size: int) -> tuple[Any, Any]:
    """(d2t [len(hot)] int64 = target id - draft id, t2d [vocab] bool) of a draft vocabulary
    holding the target tokens `hot_ids` in increasing order (EAGLE-3's convention)."""
    import torch

    hot = torch.tensor(sorted(set(hot_ids)), dtype=torch.int64)
    if hot.numel() != len(hot_ids) or int(hot.max()) >= vocab_size:
        raise ValueError(f"hot ids must be distinct target ids < {vocab_size}")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[hot] = True
    return hot - torch.arange(hot.numel()), t2d


def _rms(x, w, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, theta: float):
    """Neox-style rotary embedding of x [T, heads, D] at positions [T] (Llama's default rope)."""
    import torch

    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def draft_forward(w: dict[str, Any], cfg: dict[str, Any], embeds, hidden, positions):
    """One EAGLE-3 draft forward over a causal sequence, as SGLang's LlamaForCausalLMEagle3 runs it.

    embeds [T, H] (the target's embedding of the draft's input tokens); hidden [T, 3H] (captured
    target hidden states; fc projects them) or [T, H] (the draft's own previous output, as in
    draft decode steps); positions [T]. Returns (logits [T, draft_vocab], aux [T, H]: the
    pre-norm residual SGLang hands the next draft step).
    """
    import torch

    eps, m = cfg["rms_norm_eps"], "midlayer."
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    if hidden.shape[-1] != embeds.shape[-1]:
        hidden = hidden @ w["fc.weight"].T
    residual = hidden
    x = torch.cat([_rms(embeds, w[m + "input_layernorm.weight"], eps),
                   _rms(hidden, w[m + "hidden_norm.weight"], eps)], -1)
    t = x.shape[0]
    theta = cfg.get("rope_theta", 10000.0)
    q = _rope((x @ w[m + "self_attn.q_proj.weight"].T).view(t, heads, d), positions, theta)
    k = _rope((x @ w[m + "self_attn.k_proj.weight"].T).view(t, kv, d), positions, theta)
    v = (x @ w[m + "self_attn.v_proj.weight"].T).view(t, kv, d)
    attn = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
        enable_gqa=heads != kv)
    residual = attn.transpose(0, 1).reshape(t, heads * d) @ w[m + "self_attn.o_proj.weight"].T + residual
    h = _rms(residual, w[m + "post_attention_layernorm.weight"], eps)
    mlp = torch.nn.functional.silu(h @ w[m + "mlp.gate_proj.weight"].T) * (h @ w[m + "mlp.up_proj.weight"].T)
    residual = mlp @ w[m + "mlp.down_proj.weight"].T + residual
    return _rms(residual, w["norm.weight"], eps) @ w["lm_head.weight"].T, residual


def save_draft(directory: Path, cfg: dict[str, Any], weights: dict[str, Any], d2t, t2d) -> None:
    """config.json + model.safetensors in the real EAGLE-3 layout (module docstring)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous() for name, t in weights.items()}
    tensors.update(d2t=d2t.contiguous(), t2d=t2d.contiguous())
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
