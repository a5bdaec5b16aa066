"""CPU-engine fix for SGLang 0.5.23's native torch MoE: expert parallelism and empty batches.

Why: on the CPU engine (no AMX) every unquantized MoE layer runs
`sglang.srt.layers.moe.fused_moe_native.moe_forward_native` (from
`UnquantizedFusedMoEMethod.forward_cpu`; the plugin's fp8 CPU path calls it too). Two inputs
kill it, Helix on or off:

- `--ep-size > 1`: SGLang's StandardDispatcher maps each global expert id to this rank's local
  id and marks the experts of other EP ranks -1 (`_map_topk_ids_to_local_experts`, "the -1 drop
  sentinel both the triton and deep_gemm runners honor"). The native path scatters the ids into
  a count table and dies: "index -1 is out of bounds".
- a batch of 0 tokens (e.g. `/generate` with `{"text": ""}`): its empty output cannot be viewed as
  `[0, top_k, -1]`: "cannot reshape tensor of 0 elements".

What: one AROUND hook on `moe_forward_native`. A batch with no -1 id and at least one token goes
to SGLang's function unchanged (same tensors, same arithmetic). Otherwise only the (token, slot)
pairs routed to this rank's experts are computed: SGLang's own function runs them as top-1 pairs
with weight 1 in a dtype that holds the expert outputs exactly (so its activation, biases and
per-expert matmuls are SGLang's), the outputs go back to their (token, slot) rows, dropped rows
stay zero and their weights are zeroed, and the weighted sum over the top-k slots is SGLang's own
expression. So each rank returns the contribution of its local experts only, and SGLang's own
all-reduce after the experts (DeepSeek's `post_experts_all_reduce`, FusedMoE's `reduce_results`
elsewhere) sums the ranks, as it does for EP on GPU. A
batch of 0 tokens, or one with no pair on this rank, gives zeros of the right shape. The -1 test
is a host read, as SGLang's function already does one (`tokens_per_expert.cpu()`).

Inert on GPU: the hook is fix "native-moe" of srt.cpu.fixes, whose rows of srt.hook_table are
installed on the CPU engine only (SGLang's GPU MoE runners do not use this function anyway). Opt
out with SGLANG_HELIX_CPU_MOE_FIX=0 (tests that pin SGLang's own behaviour). `/generate` with an empty text
still fails later on the CPU engine, in SGLang's logits processor (`_get_pruned_states`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _out_features(layer: Any) -> int:
    """Rows of one expert's w2 ([hidden, intermediate]): the width of the MoE output."""
    return int(layer.w2_weight[0].shape[0])


def local_experts_forward(original: Callable, layer: Any, x: torch.Tensor, topk_output: Any,
                          moe_runner_config: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """This rank's experts' share of the MoE output; ids < 0 (other EP ranks') contribute 0."""
    topk_weights, topk_ids = topk_output[0], topk_output[1]
    tokens, top_k = topk_ids.shape
    keep = topk_ids >= 0
    pos = keep.reshape(-1).nonzero().squeeze(1)  # flat (token, slot) rows routed here
    if pos.numel() == 0:
        return x.new_zeros((tokens, _out_features(layer)))
    ones = torch.ones((pos.numel(), 1), dtype=torch.promote_types(x.dtype, torch.float32),
                      device=topk_weights.device)
    ids = topk_ids.reshape(-1)[pos].reshape(-1, 1)
    pairs = (topk_output._replace(topk_weights=ones, topk_ids=ids)
             if hasattr(topk_output, "_replace") else (ones, ids, topk_output[2]))
    outs = original(layer, x[pos // top_k], pairs, moe_runner_config, *args, **kwargs)
    rows = outs.new_zeros((tokens * top_k, outs.shape[-1]))
    rows[pos] = outs
    weights = topk_weights.masked_fill(~keep, 0)
    return (rows.view(tokens, top_k, -1)  # SGLang's combine, over zero rows for dropped ids
            .type(weights.dtype)
            .mul_(weights.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(rows.dtype))


def _around_moe_forward_native(original: Callable, layer: Any, x: torch.Tensor, topk_output: Any,
                               moe_runner_config: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    topk_ids = topk_output[1]
    if x.shape[0] > 0 and bool((topk_ids >= 0).all()):
        return original(layer, x, topk_output, moe_runner_config, *args, **kwargs)
    return local_experts_forward(original, layer, x, topk_output, moe_runner_config,
                                 *args, **kwargs)
