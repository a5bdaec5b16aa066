"""What the helix backends plan for speculative batches of SGLang 0.5.23's workers (NGRAM, EAGLE,
EAGLE-3, NEXTN), once per batch; the index math is the core's (sharding, spec_tree).

- TARGET_VERIFY: each request's n verify tokens are an extend chunk over its committed seq_lens
  tokens (the KV-sharded prefix: partial attention on every KVP rank + one exchange). A chain
  (draft i's ancestors are drafts 0..i-1) attends causally; a draft tree (top-k > 1) attends
  under its tree mask (`spec_tree.tree_masks` of SGLang's custom_mask, either layout), carried
  by the ExtendPlan to core `extend.helix_extend`. One host sync per verify batch.
- Draft decode steps of a tree (`DraftTreeStep`): step s of branch t of a request attends its
  virtual sequence (the committed prefix + the branch's page-aligned draft region, SGLang's
  layout, `spec_tree.branch_page_columns`), each rank the virtual pages of its page colour
  (`spec_tree.local_tables_by_color`); bs * topk decode rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...metadata import ExtendPlan, plan_extend
from ...spec_tree import branch_page_columns, is_chain, local_tables_by_color, tree_masks


@dataclass(frozen=True)
class DraftTreeStep:
    """Draft decode step `step` (0-based) of a top-k tree drafted in `num_steps` steps."""

    step: int
    topk: int
    num_steps: int

    def __post_init__(self) -> None:
        if not (0 <= self.step < self.num_steps and self.topk >= 1):
            raise ValueError(f"draft step {self.step} of {self.num_steps}, top-k {self.topk}")

    @property
    def extra_pages(self) -> int:
        """Local pages a branch may hold beyond the position-owned share of its virtual sequence
        (its whole draft region may land on one rank), for the decode buffers."""
        return self.num_steps + 1


def host_seq_lens(forward_batch: Any) -> torch.Tensor:
    """The batch's committed lengths on the host (SGLang's CPU mirror when it has one)."""
    lens = forward_batch.seq_lens_cpu
    return lens if lens is not None else forward_batch.seq_lens.cpu()


def plan_verify(backend: Any, forward_batch: Any) -> ExtendPlan:
    """The ExtendPlan of a TARGET_VERIFY batch (module doc); backend: a HelixBackendBase."""
    spec = forward_batch.spec_info
    n = int(spec.draft_token_num)
    prefix = host_seq_lens(forward_batch)
    masks = tree_masks(spec.custom_mask, prefix.tolist(), n)
    masks = None if is_chain(masks) else masks.to(backend.device)
    cfg = backend.cfg
    return plan_extend(
        (n,) * len(prefix), prefix, cfg.kvp_rank(backend.rank), cfg.page_size, cfg.kvp,
        local_tables=lambda lens: backend._local_tables(forward_batch, lens.to(backend.device),
                                                        int(max(prefix, default=0))),
        chunk_masks=masks)


def plan_tree_step(backend: Any, forward_batch: Any, tree: DraftTreeStep) -> None:
    """Plan `backend.helix` for one draft step of a tree: rows b * topk + t, this rank's pages of
    each branch's virtual sequence (module doc)."""
    cfg, page = backend.cfg, backend.cfg.page_size
    longest = int(host_seq_lens(forward_batch).max()) + tree.step + 1 if forward_batch.seq_lens.numel() else 0
    cols, lens = branch_page_columns(forward_batch.seq_lens, tree.topk, tree.num_steps, tree.step,
                                     page, max(1, -(-longest // page)))
    rows = backend.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.repeat_interleave(tree.topk)]
    page_ids = torch.gather(rows, 1, cols * page).to(torch.int64) // page
    slots, local_lens = local_tables_by_color(page_ids, lens, cfg.kvp_rank(backend.rank), cfg.kvp, page)
    width = min(slots.shape[1], backend.helix.meta.max_local_pages)
    slots = slots[:, :width].clamp_(0, backend.pool.per_color).to(torch.int32)
    backend.helix.plan(lens, slots, local_lens)
