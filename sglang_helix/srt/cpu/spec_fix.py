"""CPU engine: SGLang 0.5.23's NGRAM speculative decoding, by exact torch versions of the ops it lacks.

Why: `--speculative-algorithm NGRAM` on the CPU engine does not start (checked here, no AMX, no
CPU sgl-kernel build). What its decode step (drafts from the n-gram corpus -> target verify ->
greedy accept -> KV of the accepted tokens moved into place) calls that has no CPU implementation:

- `sgl_kernel.speculative.reconstruct_indices_from_tree_mask` (positions and retrieve links of the
  draft tree from its mask): imported at module level by `kernels/ops/speculative/reconstruct_tree.py`
  on every non-CUDA/HIP/XPU device; no CPU build of it exists ("No module named
  'sgl_kernel.speculative'").
- the CPU sgl-kernel ops SGLang's CPU branches call: `verify_tree_greedy_cpu` (spec_tree.py,
  `verify_tree_greedy_func`), `assign_extend_cache_locs_cpu` (cache_locs.py,
  `assign_extend_cache_locs_func` and `fill_front_out_cache_loc_func`),
  `fill_accept_out_cache_loc_cpu` (eagle.py, `fill_accept_out_cache_loc_func`),
  `assign_req_to_token_pool_cpu` (mem_cache/allocation.py, `assign_req_to_token_pool_func`, from
  `alloc_for_spec_decode`) and
  `copy_all_layer_kv_cache_cpu` (kvcache/cache_move.py, through `MHATokenToKVPool.move_kv_cache`);
  the CPU sgl-kernel is not on PyPI (srt.cpu.sgl_kernel_stub supplies import-only stand-ins).
- the torch_native backend has no TARGET_VERIFY path: its `forward_extend` reads
  `extend_prefix_lens` / `extend_seq_lens`, which a verify batch does not set, and it would apply a
  plain causal mask where the draft tree's mask is needed.

The n-gram corpus itself is a C++ extension SGLang builds at first use with tvm-ffi's JIT
(`kernels/ops/speculative/ngram_corpus.py`, `load_jit`, C++ only): it builds and runs on this CPU
with g++ (~30 s the first time, cached after).

What, on the CPU engine only (fix "ngram-spec" of srt.cpu.fixes, rows of srt.hook_table; never
installed on GPU):

- REPLACE hooks on the names SGLang's CPU branches call, with torch functions of the same signature
  and semantics as the sgl-kernel ops (read from `jit/include/sgl_kernel/speculative/ngram.cuh`,
  `eagle.cuh` `VerifyTreeGreedy` and sgl-kernel's CPU `speculative.cpp`): integer index work only,
  so they are exact;
- an AROUND hook on `TorchNativeAttnBackend.forward_extend` that runs TARGET_VERIFY batches as SDPA
  of the draft queries over the request's cached prefix plus its drafts under the draft tree's
  mask (the prefix fully visible, the tree mask among the drafts, sliding windows by position),
  storing the drafts' KV first as every other path does; all other batches go to SGLang unchanged;
- an AROUND hook on `mem_cache.allocation.get_last_loc`: CPU tensors take SGLang's torch version
  (its Triton one is picked whenever the backends are not torch_native, e.g. Helix's "helix");
- a REPLACE hook on `MHATokenToKVPool._init_kv_copy_and_warmup` (run when speculative decoding
  asks the pool for KV moves; its warm-up already calls the absent copy op, so the original
  cannot run): the pool is set to SGLang's own torch move instead (`move_kv_cache_native`, its
  `SGLANG_NATIVE_MOVE_KV_CACHE` branch).

These replace working CPU ops too where a real CPU sgl-kernel is installed (same results, one
path). Greedy verify only: SGLang's CPU branch of `eagle_sample` always verifies greedily.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch




class CpuSpecError(NotImplementedError):
    """A speculative-decoding input the CPU-engine torch path does not handle (names the case)."""


# ---------------------------------------------------------------- the sgl-kernel ops, in torch


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor, verified_seq_len: torch.Tensor, positions: torch.Tensor,
    retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor, batch_size: int, draft_token_num: int,
) -> None:
    """`reconstructIndicesFromTreeMask` (ngram.cuh), in place. With n = draft_token_num and
    m = tree_mask[b] as [n, n] (m[i, j]: j is an ancestor of i, or i itself):
    positions[b*n+t] = #{j < t: m[t, j]} + verified_seq_len[b]; retrive_index[b, t] = b*n+t;
    retrive_next_token[b, t] = min{i > t: m[i, t]} or -1; with parent(t) = max{j < t: m[t, j]},
    retrive_next_sibling[b, t] = min{i > t: parent(i) == parent(t)}, -1 if none or t is a root."""
    bs, n = int(batch_size), int(draft_token_num)
    if bs == 0:
        return
    m = tree_mask.reshape(-1)[: bs * n * n].view(bs, n, n).to(torch.bool)
    idx = torch.arange(n, device=m.device)
    anc = m & (idx[None, :] < idx[:, None])  # anc[b, i, j]: j < i is an ancestor of i
    positions[: bs * n].copy_((anc.sum(-1) + verified_seq_len[:bs, None].to(torch.int64)).reshape(-1))
    retrive_index[:bs].copy_(torch.arange(bs * n, device=m.device).view(bs, n))
    first_desc = torch.where(anc.transpose(1, 2), idx, n).amin(-1)  # [b, t]: min i > t with m[i, t]
    retrive_next_token[:bs].copy_(torch.where(first_desc < n, first_desc, -1))
    parent = torch.where(anc.any(-1), torch.where(anc, idx, -1).amax(-1), -1)  # [b, t]
    same = (parent[:, None, :] == parent[:, :, None]) & (idx[None, :] > idx[:, None])  # [b, t, i]
    first_sib = torch.where(same, idx, n).amin(-1)
    retrive_next_sibling[:bs].copy_(torch.where((parent >= 0) & (first_sib < n), first_sib, -1))


def verify_tree_greedy_cpu(
    predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
    candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor,
) -> None:
    """`verify_tree_greedy_cpu` (= CUDA `VerifyTreeGreedy`), in place. Per request: from the root,
    follow next_token; among a node's children (next_sibling chain) accept the first whose draft
    token equals the target's prediction at the last accepted node; stop at the first level with
    no match or after accept_index.shape[1] - 1 accepts. predicts[last accepted] gets the target
    token (the bonus); accept_token_num counts accepted drafts (the root excluded)."""
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    cand, ri = candidates.tolist(), retrive_index.tolist()
    nxt, sib = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    pred_flat = predicts.view(-1)
    for b in range(bs):
        last = ri[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, steps):
            cur = nxt[b][cur]
            while cur != -1:
                if cand[b][cur] == target[last]:
                    pred_flat[last] = target[last]
                    accepted += 1
                    accept_index[b, accepted] = ri[b][cur]
                    last = ri[b][cur]
                    break
                cur = sib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        pred_flat[last] = target[last]


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
    end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int,
) -> None:
    """`assign_extend_cache_locs_cpu`: out_cache_loc packs req_to_token[req_pool_indices[i],
    start_offset[i]:end_offset[i]] for i in order (as int64); entries past the total stay."""
    rows, col, total = _ranges(req_pool_indices, start_offset, end_offset)
    if total:
        out_cache_loc[:total] = req_to_token.reshape(-1, int(pool_len))[rows, col].to(out_cache_loc.dtype)


def _ranges(req_pool_indices: torch.Tensor, start_offset: torch.Tensor, end_offset: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row, column) of every slot of the ranges [start_offset[i], end_offset[i]) of rows
    req_pool_indices[i], concatenated in order, and their count."""
    lengths = (end_offset - start_offset).to(torch.int64)
    total = int(lengths.sum())
    req = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = start_offset.to(torch.int64)[req] + torch.arange(total, device=lengths.device) - starts[req]
    return req_pool_indices.to(torch.int64)[req], col, total


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
    end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int,
) -> None:
    """`assign_req_to_token_pool_cpu`, the inverse of `assign_extend_cache_locs_cpu`: for i in
    order, req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] takes the next
    end - start entries of out_cache_loc (cast to req_to_token's dtype)."""
    rows, col, total = _ranges(req_pool_indices, start_offset, end_offset)
    if total:
        req_to_token.view(-1, int(pool_len))[rows, col] = out_cache_loc[:total].to(req_to_token.dtype)


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor, out_cache_loc: torch.Tensor, accept_out_cache_loc: torch.Tensor,
    size: int | None = None,
) -> None:
    """`fill_accept_out_cache_loc_cpu`: the first `size` entries of accept_index (all by default),
    in order, skipping -1: accept_out_cache_loc[k] = out_cache_loc[k-th index]; the rest stays."""
    flat = accept_index.reshape(-1)
    flat = flat[: flat.numel() if size is None else int(size)].to(torch.int64)
    src = flat[flat > -1]
    accept_out_cache_loc[: src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


# ---------------------------------------------------------------- target verify on torch_native


def verify_masks(custom_mask: torch.Tensor, seq_lens: Sequence[int], n: int) -> list[torch.Tensor]:
    """Per request, the [n, L + n] bool mask of its draft queries over prefix + drafts.

    Two layouts of `custom_mask` (SGLang's TreeMaskMode): QLEN_ONLY, [bs, n, n] flat (what NGRAM
    builds on CPU; the prefix is fully visible), and FULL_MASK, each request's [n, L + n] rows
    flat one after another."""
    bs, flat = len(seq_lens), custom_mask.reshape(-1).to(torch.bool)
    full = sum(n * (length + n) for length in seq_lens)
    if flat.numel() == bs * n * n:
        tree = flat.view(bs, n, n)
        return [torch.cat([tree.new_ones(n, length), tree[b]], 1) for b, length in enumerate(seq_lens)]
    if flat.numel() == full:
        out, start = [], 0
        for length in seq_lens:
            out.append(flat[start:start + n * (length + n)].view(n, length + n))
            start += n * (length + n)
        return out
    raise CpuSpecError(f"verify mask of {flat.numel()} elements fits neither [bs, n, n] = "
                       f"{bs * n * n} nor the full layout = {full} (bs {bs}, n {n})")


def verify_attention(backend: Any, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                     layer: Any, forward_batch: Any, save_kv_cache: bool = True) -> torch.Tensor:
    """TARGET_VERIFY for TorchNativeAttnBackend: store the drafts' KV at out_cache_loc, then per
    request SDPA of its n draft queries over req_to_token[req, :L + n] under `verify_masks`."""
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
        raise CpuSpecError("speculative verify on the CPU engine: cross / encoder-only attention")
    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    spec = forward_batch.spec_info
    n = int(spec.draft_token_num)
    lens = [int(x) for x in forward_batch.seq_lens.tolist()]
    masks = verify_masks(spec.custom_mask, lens, n)
    heads, kv_heads = layer.tp_q_head_num, layer.tp_k_head_num
    query = q.reshape(-1, heads, layer.qk_head_dim).movedim(0, 1)  # [H, T, D]
    out = q.new_empty((query.shape[1], heads, layer.v_head_dim))
    k_cache = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_cache = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    table = backend.req_to_token_pool.req_to_token
    window = layer.sliding_window_size
    positions = spec.positions.view(-1, n) if window is not None and window > -1 else None
    for b, length in enumerate(lens):
        tokens = table[forward_batch.req_pool_indices[b], : length + n]
        key = k_cache[tokens].movedim(0, 1).to(query.dtype)
        value = v_cache[tokens].movedim(0, 1).to(query.dtype)
        mask = masks[b]
        if positions is not None:  # key positions: 0..L-1, then the drafts' own positions
            key_pos = torch.cat([torch.arange(length, device=mask.device), positions[b].to(mask.device)])
            mask = mask & (key_pos[None, :] >= positions[b].to(mask.device)[:, None] - window)
        out[b * n:(b + 1) * n] = torch.nn.functional.scaled_dot_product_attention(
            query[:, b * n:(b + 1) * n].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
            attn_mask=mask, scale=layer.scaling, enable_gqa=heads != kv_heads,
        ).squeeze(0).movedim(0, 1)
    return out.view(-1, heads * layer.v_head_dim)


def _around_forward_extend(original: Callable, backend: Any, q: torch.Tensor, k: Any, v: Any,
                           layer: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    if not forward_batch.forward_mode.is_target_verify():
        return original(backend, q, k, v, layer, forward_batch, *args, **kwargs)
    return verify_attention(backend, q, k, v, layer, forward_batch, *args, **kwargs)


def native_kv_move(pool: Any, *args: Any, **kwargs: Any) -> None:
    """`MHATokenToKVPool._init_kv_copy_and_warmup`, replaced: instead of configuring (and warming
    up with a slot-0 -> slot-0 copy) the tiled byte copy, the pool moves KV by SGLang's own torch
    branch (`move_kv_cache_native`)."""
    pool._kv_copy_config = None
    pool.use_native_move_kv_cache = True


def _around_get_last_loc(original: Callable, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         prefix_lens: torch.Tensor) -> torch.Tensor:
    """CPU tensors: SGLang's own torch `get_last_loc_torch` (same result). SGLang picks its Triton
    kernel unless the prefill and decode backends are torch_native / ascend, and with Helix they
    are "helix", so the speculative decode allocation (`alloc_for_spec_decode`) died on CPU in
    Triton ("0 active drivers")."""
    if req_to_token.device.type != "cpu":
        return original(req_to_token, req_pool_indices, prefix_lens)
    from sglang.srt.mem_cache.allocation import get_last_loc_torch

    return get_last_loc_torch(req_to_token, req_pool_indices, prefix_lens)
