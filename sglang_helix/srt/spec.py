"""Speculative decoding with Helix on (SGLang 0.5.23 NGRAM chain drafts, DeepSeek NEXTN): the drafter side.

NEXTN (MTP): the draft runner's KV pool is a Helix pool of its own behind the target's shared
allocator (srt.memory.hooks), and its draft extend after each verify runs on a helix backend of
the draft runner (the AROUND hook on `DraftBackendFactory.create_draft_extend_backend` below):
the MTP layer attends its KV-sharded latent prefix with partial attention + one exchange, as the
target does. With more than one draft step (chains, top-k 1) its decode steps run on
`HelixMultiStepDraftBackend` (the AROUND hook on `create_decode_backend`). These two hooks own
their rows of srt.hook_table: with Helix off they hand the call to the CPU engine's EAGLE fix
(srt.cpu.eagle_fix: torch_native draft backends there, SGLang's factory everywhere else).

NGRAM:

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

from ..config import HelixConfigError
from . import state
from .cpu import eagle_fix

HELIX_BACKEND = "helix"  # srt.backends.base.BACKEND_NAME (not imported here: that module imports SGLang's attention)


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


def _draft_backend(draft_runner: Any, **kwargs: Any) -> Any:
    """A helix backend of the draft runner (its own Helix pool), stamped with the name SGLang's
    draft factory stamps on the backends it makes; kwargs: the backend's (a draft-tree step)."""
    from .backends.base import BACKEND_NAME
    from .backends.factory import create_helix_backend

    backend = create_helix_backend(draft_runner, **kwargs)
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = BACKEND_NAME
    return backend


def _helix_draft(factory: Any) -> bool:
    """Helix is on for this draft runner; a draft backend asked for by another name could not read
    its Helix pool and is refused."""
    if state.config_of(factory.draft_model_runner.server_args) is None:
        return False
    if factory.draft_attn_backend not in (None, HELIX_BACKEND):
        raise HelixConfigError(f"--speculative-draft-attention-backend {factory.draft_attn_backend}: "
                               f"with Helix the draft layer attends its Helix KV pool on the "
                               f"'{HELIX_BACKEND}' backend; drop --speculative-draft-attention-backend")
    return True


def _around_draft_extend_backend(original: Callable, factory: Any, *args: Any, **kwargs: Any) -> Any:
    """NEXTN with Helix on: the draft runner (DeepSeek's MTP layer, its own Helix pool with the
    target's page colours, srt.memory.hooks) extends the accepted tokens on its own helix backend:
    partial attention over each rank's latent pages + one exchange, as the target. Helix off: the
    CPU engine's EAGLE fix (SGLang's factory unless torch_native on the CPU engine)."""
    if not _helix_draft(factory):
        return eagle_fix.draft_extend_backend(original, factory, *args, **kwargs)
    return _draft_backend(factory.draft_model_runner)


class HelixMultiStepDraftBackend:
    """The draft model's decode steps under Helix (MTP layer, EAGLE / EAGLE-3 draft): one helix
    backend per step but the last (SGLang's multi-step draft backend contract: `attn_backends`,
    and `init_forward_metadata` once per draft), then one exchange per layer.

    Chains (top-k 1): step s decodes the token at position seq_len + s, so it attends
    seq_len + s + 1 tokens; their slots were allocated ahead with their positions' page colours,
    so each rank attends its own pages of them. Trees (top-k > 1): step s decodes top-k rows per
    request, branch t attending the committed prefix and its own page-aligned draft region
    (SGLang's layout); each rank attends the pages of its colour (srt.backends.spec_plans)."""

    def __init__(self, draft_runner: Any, topk: int, num_steps: int):
        from .backends.spec_plans import DraftTreeStep

        self.topk, self.speculative_num_steps = topk, num_steps
        self.attn_backends = []
        for step in range(num_steps - 1):
            tree = DraftTreeStep(step, topk, num_steps) if topk > 1 else None
            backend = _draft_backend(draft_runner, draft_tree=tree)
            if tree is None:
                backend.decode_len_offset = step + 1  # also when SGLang re-plans a step itself
            self.attn_backends.append(backend)
        self.prefill_attention_backend_str = self.decode_attention_backend_str = HELIX_BACKEND

    def init_forward_metadata(self, forward_batch: Any) -> None:
        for backend in self.attn_backends:
            backend.init_forward_metadata(forward_batch)


def _around_draft_decode_backend(original: Callable, factory: Any, *args: Any, **kwargs: Any) -> Any:
    """NEXTN with Helix on and more than one draft step: the helix multi-step draft backend
    (one step: SGLang makes none). Helix off: the CPU engine's EAGLE fix, as above."""
    if state.config_of(factory.draft_model_runner.server_args) is None:
        return eagle_fix.draft_decode_backend(original, factory, *args, **kwargs)
    if factory.speculative_num_steps <= 1 or not _helix_draft(factory):
        return original(factory, *args, **kwargs)
    return HelixMultiStepDraftBackend(factory.draft_model_runner, factory.topk, factory.speculative_num_steps)


def _around_handle_eagle_family(original: Callable, server_args: Any) -> None:
    """SGLang resolves EAGLE-family settings and, last, refuses top-k > 1 at a page size > 1 on any
    attention backend but its page-tree ones (flashinfer, fa3, triton: two-pass draft decode over a
    shared prefix + per-branch pages). With Helix the helix backend serves page trees (tree verify
    over the KV-sharded prefix, branch tables by page colour, cross-rank KV moves; srt.backends.
    spec_plans, srt.memory.pools), so that refusal is stepped over; every other refusal stands.
    Helix off: the CPU engine's EAGLE fix decides (its torch_native draft steps serve trees)."""
    from .resolution import helix_args_of

    helix = helix_args_of(server_args)
    if helix is None or not helix.enable_helix:
        return eagle_fix.handle_eagle_family(original, server_args)
    try:
        original(server_args)
    except ValueError as err:
        if not eagle_fix.page_tree_refusal(err):
            raise

