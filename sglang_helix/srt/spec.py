"""Speculative decoding with Helix on (SGLang 0.5.23 NGRAM, chain drafts): the drafter side.

The helix attention backend verifies chain drafts (srt.backends.base `_plan_verify`: each
request's n drafts are an extend chunk over its committed tokens, causal among themselves, so
the one prefill-over-a-sharded-prefix algorithm, core `extend.helix_extend`, runs them). NGRAM
with `--speculative-ngram-max-bfs-breadth 1` matches chains, but its corpus pads a short match
up to n tokens with token 0 nodes hanging off the *root* (`fillResult` in SGLang's
`ngram_corpus/result.cpp`), i.e. a tree. Under Helix the AROUND hook below on the corpus lookup
(`NgramCorpus.batch_get`, which NGRAMWorker._prepare_draft_tokens calls; hooked there rather than
on the worker because the worker module imports sgl_kernel.speculative, absent off the CPU engine
on a machine without a GPU build) turns every request's [n, n] draft mask into the chain mask
(lower triangular): the padding drafts become the chain's continuation instead of the root's
siblings.

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

BATCH_GET_TARGET = "sglang.srt.speculative.cpp_ngram.ngram_corpus.NgramCorpus.batch_get"


def chain_mask(mask: np.ndarray, num_drafts: int) -> np.ndarray:
    """The chain draft mask in `mask`'s dtype and flat layout: mask [B * n * n] (request b's
    [n, n] block: row i marks the drafts draft i attends) -> every block lower triangular."""
    n = int(num_drafts)
    bs = mask.size // (n * n)
    if bs * n * n != mask.size:
        raise ValueError(f"draft mask of {mask.size} elements is not [B, {n}, {n}]")
    tril = np.tril(np.ones((n, n), dtype=mask.dtype))
    return np.broadcast_to(tril, (bs, n, n)).reshape(mask.shape).copy()


def _around_batch_get(original: Callable, corpus: Any, *args: Any, **kwargs: Any) -> Any:
    """NgramCorpus.batch_get -> (draft tokens [B * n], mask [B * n * n]); with Helix on in this
    process (the published ServerArgs carry a HelixConfig) the mask becomes the chain mask."""
    drafts, mask = original(corpus, *args, **kwargs)
    if state.current_config() is None:
        return drafts, mask
    return drafts, chain_mask(mask, corpus.draft_token_num)


SPEC_HOOKS = (HookSpec(BATCH_GET_TARGET, "AROUND", _around_batch_get),)
