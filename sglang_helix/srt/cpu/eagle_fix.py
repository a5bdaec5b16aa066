"""CPU engine: SGLang 0.5.23's EAGLE worker for DeepSeek NEXTN (MTP) drafts, by exact torch ops.

Why: `--speculative-algorithm NEXTN` on the CPU engine (no AMX, no CPU sgl-kernel build; checked
here, Helix off) stops at, in order:

- `DeepseekV2ForCausalLM.set_embed_and_head` (the draft shares the target's embedding and LM
  head) ends with `torch.cuda.empty_cache(); torch.cuda.synchronize()`: "Found no NVIDIA driver";
- `DraftBackendFactory.create_draft_extend_backend` has no entry for `torch_native` ("EAGLE is not
  supported in attention backend torch_native"): the draft layer's extend after each verify needs
  an attention backend on the draft runner;
- the CPU sgl-kernel ops its CPU branches call: `build_tree_kernel_efficient_cpu` (spec_tree.py,
  the verify tree of the drafts), `assign_draft_cache_locs_contiguous_cpu` (cache_locs.py, the
  draft steps' KV slots) and `fill_bonus_tokens_cpu` (eagle.py, the target's token after the
  accepted drafts); the CPU sgl-kernel is not on PyPI (srt.cpu.sgl_kernel_stub supplies
  import-only stand-ins). The NGRAM ops it shares (greedy verify, cache-slot gathers) are
  srt.cpu.spec_fix's.

What, on the CPU engine only (fix "eagle" of srt.cpu.fixes, rows of srt.hook_table; never installed
on GPU): REPLACE hooks with host-side Python/torch versions of those three ops, ported line by line
from SGLang's own Triton kernels of the same semantics (`sgl_build_tree_kernel_efficient_triton`,
`assign_draft_cache_locs_contiguous`, `fill_bonus_tokens`; integer index work, so exact; the tests
compare them with those kernels under the Triton interpreter); an AROUND hook on set_embed_and_head
doing the same assignment without the CUDA calls for CPU tensors; and, when the configured backend
is torch_native, a `TorchNativeAttnBackend` for the draft runner's draft extend and
`TorchNativeMultiStepDraftBackend` for more than one draft step (SGLang has no multi-step draft
backend for torch_native; chains only). The draft backend factory's two targets are shared with
Helix's own draft backends: their rows belong to srt.spec, which calls `draft_extend_backend` /
`draft_decode_backend` here whenever Helix is off.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .fixes import cpu_fix

TORCH_NATIVE = "torch_native"


def build_tree_kernel_efficient_cpu(
    parent_list: torch.Tensor, selected_index: torch.Tensor, verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor, positions: torch.Tensor, retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor, retrieve_next_sibling: torch.Tensor, topk: int, depth: int,
    draft_token_num: int, tree_mask_mode: int,
) -> None:
    """`build_tree_kernel_efficient` (SGLang's `sgl_build_tree_kernel_efficient_triton`), in place.

    Request b's n = draft_token_num verify tokens: 0 the bonus (root), i >= 1 the draft picked by
    selected_index[b, i - 1] (an index into the topk-expanded draft list; // topk gives its
    parent's slot in parent_list[b]). Writes positions[b*n + i] = seq_len + depth of i, the links
    retrieve_index / next_token / next_sibling (children pushed in front: the last-listed child is
    first), and each token's tree-mask row: itself and its ancestors True, other drafts False;
    tree_mask_mode 0 (FULL_MASK) rows are [seq_len + n] per token after all earlier requests'
    rows (their prefix columns are left as the caller filled them), otherwise [n] per token.
    """
    n, bs = int(draft_token_num), int(verified_seq_len.shape[0])
    seq = [int(x) for x in verified_seq_len.tolist()]
    parents = parent_list.reshape(bs, -1).tolist()
    selected = selected_index.reshape(bs, -1).tolist()
    mask, pos = tree_mask.view(-1), positions.view(-1)
    r_index, r_next, r_sib = retrieve_index.view(-1), retrieve_next_token.view(-1), retrieve_next_sibling.view(-1)
    prefix = 0
    for b in range(bs):
        sel, par, base = selected[b], parents[b], b * n
        slot = {token: i for i, token in reversed(list(enumerate(sel[: n - 1])))}  # first match wins

        def parent_slot(i: int):
            """Verify slot of draft i's parent (0: the root); None if it is not among the drafts."""
            tb = sel[i - 1] // topk
            if tb == 0:
                return 0
            found = slot.get(par[tb])
            return None if found is None else found + 1

        pos[base] = seq[b]
        for i in range(n - 1, 0, -1):
            r_index[base + i] = base + i
            p = parent_slot(i)
            if p is not None:
                old = int(r_next[base + p])
                r_next[base + p] = i
                if old != -1:
                    r_sib[base + i] = old
        r_index[base] = base
        for x in range(n):
            row = (n * n * b + prefix * n + (seq[b] + n) * x + seq[b] if int(tree_mask_mode) == 0
                   else n * n * b + n * x)
            mask[row] = True
            mask[row + 1: row + n] = False
            if x > 0:
                pos[base + x] = seq[b] + _mark_ancestors(mask, row + 1, x, sel, par, topk, depth, slot)
        prefix += seq[b]


def _mark_ancestors(mask, start, x, sel, par, topk, depth, slot) -> int:
    """Mark draft x and its ancestors in a mask row whose draft columns begin at `start`; returns
    x's depth (the kernel's loop, bounded by `depth`)."""
    cur, level = x - 1, 0
    for _ in range(int(depth)):
        level += 1
        mask[start + cur] = True
        tb = sel[cur] // topk
        if tb == 0:
            break
        found = slot.get(par[tb])
        if found is None:
            break
        cur = found
    return level


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor, pool_len: int, topk: int, num_cols: int,
) -> None:
    """`assign_draft_cache_locs_contiguous`: out_cache_loc[b*w:(b+1)*w] = req_to_token[
    req_pool_indices[b], seq_lens[b]:seq_lens[b]+w] with w = topk * num_cols (the draft steps'
    slots, allocated ahead into req_to_token)."""
    width = int(topk) * int(num_cols)
    rows = req_to_token.reshape(-1, int(pool_len))
    cols = seq_lens.to(torch.int64)[:, None] + torch.arange(width, device=seq_lens.device)
    locs = rows[req_pool_indices.to(torch.int64)[:, None], cols]
    out_cache_loc[: locs.numel()] = locs.reshape(-1).to(out_cache_loc.dtype)


def fill_bonus_tokens_cpu(accept_tokens: torch.Tensor, accept_lens: torch.Tensor,
                          bonus_tokens: torch.Tensor, accept_stride: int) -> None:
    """`fill_bonus_tokens`: bonus_tokens[b] = accept_tokens.flat[b*stride + accept_lens[b] - 1]
    (accept_lens counts the bonus token)."""
    bs = accept_lens.numel()
    idx = torch.arange(bs, device=accept_lens.device) * int(accept_stride) + accept_lens.to(torch.int64) - 1
    bonus_tokens[:bs] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def _around_set_embed_and_head(original: Callable, model: Any, embed: torch.Tensor,
                               head: torch.Tensor) -> None:
    """The draft takes the target's embedding and head: SGLang's assignment, minus its CUDA
    cache / sync calls, for CPU tensors."""
    if embed.device.type != "cpu":
        return original(model, embed, head)
    del model.model.embed_tokens.weight
    del model.lm_head.weight
    model.model.embed_tokens.weight = embed
    model.lm_head.weight = head


def _draft_backend_name(factory: Any) -> str:
    from sglang.srt.runtime_context import attention_backends

    return factory.draft_attn_backend or attention_backends()[0]


def _torch_native_draft(factory: Any) -> bool:
    """This fix is on (CPU engine) and the draft runner's backend is torch_native."""
    return cpu_fix("eagle").enabled() and _draft_backend_name(factory) == TORCH_NATIVE


def draft_extend_backend(original: Callable, factory: Any, *args: Any, **kwargs: Any):
    """`DraftBackendFactory.create_draft_extend_backend` without Helix: on the CPU engine with
    torch_native the draft runner's own TorchNativeAttnBackend for the draft extend; else SGLang's."""
    if not _torch_native_draft(factory):
        return original(factory, *args, **kwargs)
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return _stamped(TorchNativeAttnBackend(factory.draft_model_runner))


def _stamped(backend: Any) -> Any:
    """The backend name SGLang's draft factory stamps on the backends it makes."""
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = TORCH_NATIVE
    return backend


def draft_decode_backend(original: Callable, factory: Any, *args: Any, **kwargs: Any):
    """`DraftBackendFactory.create_decode_backend` without Helix: torch_native on the CPU engine has
    no multi-step draft decode backend, so `TorchNativeMultiStepDraftBackend` (chains and trees);
    else SGLang's."""
    if factory.speculative_num_steps <= 1 or not _torch_native_draft(factory):
        return original(factory, *args, **kwargs)
    return TorchNativeMultiStepDraftBackend(factory.draft_model_runner, factory.topk,
                                            factory.speculative_num_steps)


class TorchNativeMultiStepDraftBackend:
    """Draft decode steps on torch_native, SGLang's torch_native decode over each row's tokens.

    Chains (top-k 1): step s decodes the token at position seq_len + s over req_to_token[:seq_len +
    s + 1] (the draft slots sit there, allocated ahead). Trees (top-k > 1): step s decodes top-k
    rows per request; branch t attends the virtual sequence of SGLang's draft layout (the paged
    backends' reading: the prefix, then its own draft region whose first page holds a copy of the
    prefix's tail, core spec_tree.branch_page_columns), given to SGLang's decode as a row of token
    locs of its own."""

    def __init__(self, draft_runner: Any, topk: int, num_steps: int):
        step_cls = _torch_native_step_class()
        self.topk, self.speculative_num_steps = topk, num_steps
        self.attn_backends = [_stamped(step_cls(draft_runner, step, topk, num_steps))
                              for step in range(num_steps - 1)]
        _stamped(self)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        for backend in self.attn_backends:
            backend.init_forward_metadata(forward_batch)


def branch_token_locs(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                      topk: int, num_steps: int, step: int, page_size: int):
    """(locs [B * topk, L_max] token locs of each branch's virtual sequence, lens [B * topk])."""
    from ...spec_tree import branch_page_columns

    longest = int(seq_lens.max()) + step + 1
    cols, lens = branch_page_columns(seq_lens, topk, num_steps, step, page_size, -(-longest // page_size))
    pos = torch.arange(longest, device=seq_lens.device)
    token_cols = cols[:, pos // page_size] * page_size + pos % page_size  # [R, L_max]
    rows = req_to_token[req_pool_indices.to(torch.int64).repeat_interleave(topk)]
    return torch.gather(rows, 1, token_cols.to(torch.int64)), lens


def _torch_native_step_class() -> type:
    from types import SimpleNamespace

    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    class TorchNativeDraftStep(TorchNativeAttnBackend):
        """One draft step: a chain's decode over the committed tokens + step + 1, or a tree's
        rows over their branches' token locs (TorchNativeMultiStepDraftBackend)."""

        def __init__(self, model_runner: Any, step: int, topk: int = 1, num_steps: int = 0):
            super().__init__(model_runner)
            self.step, self.topk, self.num_steps = step, topk, num_steps
            self.page_size = model_runner.page_size

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            view = copy.copy(forward_batch)
            if self.topk == 1:
                view.seq_lens = forward_batch.seq_lens + self.step + 1
                return super().forward_decode(q, k, v, layer, view, save_kv_cache, **kwargs)
            locs, view.seq_lens = branch_token_locs(
                self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                forward_batch.seq_lens, self.topk, self.num_steps, self.step, self.page_size)
            view.req_pool_indices = torch.arange(locs.shape[0], device=locs.device)
            real, self.req_to_token_pool = self.req_to_token_pool, SimpleNamespace(req_to_token=locs)
            try:  # SGLang's decode reads self.req_to_token_pool.req_to_token rows
                return super().forward_decode(q, k, v, layer, view, save_kv_cache, **kwargs)
            finally:
                self.req_to_token_pool = real

    return TorchNativeDraftStep


def page_tree_refusal(err: Exception) -> bool:
    """SGLang's refusal of top-k > 1 at a page size > 1 outside its page-tree backends."""
    return "speculative_eagle_topk > 1 with page_size > 1 is only supported on" in str(err)


def handle_eagle_family(original: Callable, server_args: Any) -> None:
    """`_handle_eagle_family` without Helix: on the CPU engine with torch_native the multi-step
    draft backend above serves page trees (SGLang's refusal of them, the step's last statement,
    is stepped over); else SGLang's step unchanged."""
    try:
        original(server_args)
    except ValueError as err:
        if not (page_tree_refusal(err) and cpu_fix("eagle").enabled()
                and _resolved_attention_backend(server_args) == TORCH_NATIVE):
            raise


def _resolved_attention_backend(server_args: Any) -> str | None:
    from sglang.srt.arg_groups.overrides import resolved_view

    view = resolved_view(server_args)
    return getattr(view, "speculative_draft_attention_backend", None) or view.attention_backend
