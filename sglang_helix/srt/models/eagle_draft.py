"""EAGLE-3 draft layers under Helix (SGLang 0.5.23 `models/llama_eagle3.py`).

The EAGLE-3 draft's decoder layer subclasses SGLang's LlamaDecoderLayer, so its LlamaAttention is
re-shaped TPA ways by srt.models.gqa's hook while it is built; then the draft layer replaces
`self_attn.qkv_proj` with a stock QKVParallelLinear whose input is 2 x hidden (the normed token
embedding and the normed hidden state, concatenated) sharded TP = N ways, which would hand the
Helix attention H/N query heads instead of H/TPA. The AROUND hook below (a row of srt.hook_table)
rebuilds that projection TPA ways with the same 2 x hidden input (srt.models.gqa._tpa_qkv), so
SGLang's loader slices the checkpoint's q/k/v TPA ways as for the target. The draft's heads must
be the target's (real EAGLE-3 drafts copy the target's attention dims): the HelixConfig, the Helix
draft pool and the helix backends are the target's.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .. import state
from .gqa import HelixModelError, _tpa_qkv


def _around_eagle3_layer_init(original: Callable, layer: Any, *args: Any, **kwargs: Any) -> None:
    """`llama_eagle3.LlamaDecoderLayer.__init__`: stock init, then (Helix, KVP > 1) its QKV
    projection rebuilt TPA ways with the layer's own input width."""
    original(layer, *args, **kwargs)
    cfg = state.current_config()
    if cfg is None:
        return
    attn = layer.self_attn
    if attn.num_heads != cfg.heads_per_tpa or attn.num_kv_heads != cfg.kv_heads_per_tpa:
        raise HelixModelError(
            f"EAGLE-3 draft layer with {attn.total_num_heads} query / {attn.total_num_kv_heads} KV "
            f"heads, the target {cfg.num_heads} / {cfg.num_kv_heads}: under Helix the draft shares "
            f"the target's attention layout; use a draft with the target's heads or drop --enable-helix")
    if cfg.kvp == 1:  # TP = N = TPA: the stock projection is already TPA-sharded
        return
    bound = inspect.signature(original).bind(layer, *args, **kwargs)
    bound.apply_defaults()
    prefix = bound.arguments.get("prefix", "") or ""
    width = 2 * layer.hidden_size if layer.is_input_layer else layer.hidden_size
    attn.qkv_proj = _tpa_qkv(attn, cfg, False, bound.arguments.get("quant_config"),
                             f"{prefix}.qkv_proj" if prefix else "qkv_proj", input_size=width)
