"""Speculative decoding with Helix on (SGLang 0.5.23 NGRAM, chain drafts): the drafter side.

The helix attention backend verifies chain drafts (srt.backends.base `_plan_verify`: each
request's n drafts are an extend chunk over its committed tokens, causal among themselves, so
the one prefill-over-a-sharded-prefix algorithm, core `extend.helix_extend`, runs them). NGRAM
with `--speculative-ngram-max-bfs-breadth 1` matches chains, but its corpus pads a short match
up to n tokens with token 0 nodes hanging off the *root* (`fillResult` in SGLang's
`ngram_corpus/result.cpp`), i.e. a tree. Under Helix the AROUND hook below turns every request's
[n, n] draft mask into the chain mask (lower triangular): the padding drafts become the chain's
continuation instead of the root's siblings.

Lossless either way: greedy verification accepts draft i only if it equals the target's own
argmax after drafts 0..i-1, and with the chain mask the target sees exactly those ancestors.
Only which padding token can be accepted changes (a 0 after the last real draft instead of a 0
right after the root), so acceptance can differ from Helix off; the tokens cannot.

Chains also keep the KV in place: an accepted draft already sits at its own position, so SGLang's
`move_kv_cache` after verify moves each KV onto itself (srt.memory.pools, never across KVP ranks).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import state
from .hooks import HookSpec

PREPARE_DRAFTS_TARGET = "sglang.srt.speculative.ngram_worker.NGRAMWorker._prepare_draft_tokens"


def chain_mask(mask: np.ndarray, num_drafts: int) -> np.ndarray:
    """The chain draft mask in `mask`'s dtype and flat layout: mask [B * n * n] (request b's
    [n, n] block: row i marks the drafts draft i attends) -> every block lower triangular."""
    n = int(num_drafts)
    bs = mask.size // (n * n)
    if bs * n * n != mask.size:
        raise ValueError(f"draft mask of {mask.size} elements is not [B, {n}, {n}]")
    tril = np.tril(np.ones((n, n), dtype=mask.dtype))
    return np.broadcast_to(tril, (bs, n, n)).reshape(mask.shape).copy()


def _around_prepare_draft_tokens(original: Callable, worker: Any, batch: Any) -> Any:
    """NGRAMWorker._prepare_draft_tokens -> (draft tokens [B * n], mask [B * n * n]); with Helix on
    the mask is replaced by the chain mask (module doc)."""
    drafts, mask = original(worker, batch)
    if state.config_of(worker.server_args) is None:
        return drafts, mask
    return drafts, chain_mask(mask, worker.draft_token_num)


SPEC_HOOKS = (HookSpec(PREPARE_DRAFTS_TARGET, "AROUND", _around_prepare_draft_tokens),)
