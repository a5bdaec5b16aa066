"""A DeepSeek-V3 MTP (NEXTN) layer added to a tiny MLA checkpoint, in DeepSeek-V3's on-disk format.

DeepSeek-V3/R1 ship one multi-token-prediction layer after the last decoder layer: config key
`num_nextn_predict_layers: 1`, tensors under `model.layers.{num_hidden_layers}.`: a full decoder
layer (MLA attention + MoE) plus `enorm`, `hnorm` (RMSNorm weights of the next token's embedding
and of the target's hidden state), `eh_proj` ([hidden, 2 * hidden]: the two concatenated, in that
order), `shared_head.norm`, `shared_head.head` (the LM head) and `embed_tokens`. SGLang's
`DeepseekV3ForCausalLMNextN` loads exactly these (deepseek_weight_loader, nextn prefix
`model.layers.{num_hidden_layers}`); transformers ignores them, so the target model and its
greedy reference are unchanged.

The tiny MTP layer is the checkpoint's last decoder layer plus seeded noise (5% of N(0, 1)),
random `eh_proj` (scale INIT_RANGE), unit norms and copies of the embedding and LM head: random
weights, so it drafts the target's next-next token only rarely (measured acceptance lengths in
tests/e2e/test_serve_spec.py and docs/usage.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MTP_NOISE = 0.05


def mtp_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """An MLA config with one NEXTN layer (DeepSeek-V3's `num_nextn_predict_layers`)."""
    return {**cfg, "num_nextn_predict_layers": 1}


def add_mtp_layer(directory: str | Path, seed: int, init_range: float) -> None:
    """Write the MTP layer's tensors into `directory`/model.safetensors (config.json must say
    num_nextn_predict_layers 1; the checkpoint holds layers 0..L-1)."""
    import torch
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("num_nextn_predict_layers") != 1:
        raise ValueError(f"{directory}: config.json needs num_nextn_predict_layers 1 for an MTP layer")
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    path = directory / "model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(seed + 7)
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."

    def noisy(t):
        return (t.float() + MTP_NOISE * torch.randn(t.shape, generator=gen)).to(t.dtype).contiguous()

    for name in [n for n in weights if n.startswith(last)]:
        weights[mtp + name[len(last):]] = noisy(weights[name])
    dtype = weights["lm_head.weight"].dtype
    weights.update({
        mtp + "enorm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "hnorm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "eh_proj.weight": (torch.randn(hidden, 2 * hidden, generator=gen) * init_range).to(dtype),
        mtp + "shared_head.norm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "shared_head.head.weight": weights["lm_head.weight"].clone(),
        mtp + "embed_tokens.weight": weights["model.embed_tokens.weight"].clone(),
    })
    save_file(weights, path, metadata={"format": "pt"})
