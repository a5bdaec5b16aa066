"""PD decode retraction backup (`cpu_tensor`) for the Helix pools: each KVP rank keeps its pages.

SGLang 0.5.23's decode server retracts requests under KV memory pressure. With
`--disaggregation-decode-retraction-backup cpu_tensor` (the Helix default, declared by srt.resolution):

- retract: `Req.offload_kv_cache` calls `pool.get_cpu_copy(locs)` with the logical locs of the
  request's first seqlen - 1 tokens (req_to_token), then the request's pages are freed;
- resume: `DecodePreallocQueue._pre_alloc` allocates the same number of tokens from position 0
  (`alloc_extend`, so logical page j gets an id of color j % KVP again: the coloring is by
  position, not by id) and `Req.load_kv_cache` calls `pool.load_cpu_copy(backup, new_locs)`.

Under Helix every rank runs both calls (SPMD) and copies only the rows it owns: the tokens of the
logical pages j with j % KVP == its KVP rank. The backup records which of the request's tokens
those were; the restore checks that the new locs give this rank exactly the same tokens (same
owner color per logical page; anything else raises instead of scattering KV to the wrong rank)
and writes the rows back bit for bit into the new pages' local slots. Nothing of another rank's
pages is read or written. fp8 pages are copied as stored (1 byte per element); the per-tensor
scales live on the layers, not in the pool.

The `host_pool` backup (HiCache host mirror of the device pool, by loc) is not supported under
Helix and is refused at launch (rules.pd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import HelixError
from ...rules.pd import HELIX_RETRACTION_BACKUP


class HelixRetractionError(HelixError):
    """A retraction backup that cannot be restored on this rank without moving KV to another."""


@dataclass
class HelixKVBackup:
    """One rank's copy of a retracted request's KV.

    owned: [n] bool (host), token i of the request's n backed-up tokens is on this rank;
    tensors: per pool buffer (pool_buffers order), the owned tokens' rows [owned.sum(), ...] on
    the host, in token order; kvp, kvp_rank: the rank that made it.
    """

    owned: torch.Tensor
    tensors: list
    kvp: int
    kvp_rank: int

    @property
    def num_tokens(self) -> int:
        return int(self.owned.numel())


def pool_buffers(pool) -> list:
    """The per-layer KV buffers of a Helix pool: MLA kv_buffer, or GQA k_buffer then v_buffer."""
    if getattr(pool, "kv_buffer", None) is not None and not hasattr(pool, "k_buffer"):
        return list(pool.kv_buffer)
    return list(pool.k_buffer) + list(pool.v_buffer)


def _sync(device) -> None:
    dev = torch.device(device)
    if dev.type != "cpu":  # a forward may still be writing these pages (overlap scheduler)
        torch.get_device_module(dev).synchronize(dev)


def copy_out(pool, locs: torch.Tensor) -> HelixKVBackup:
    """This rank's rows of the tokens at logical `locs` [n], copied to host memory."""
    rows, owned = pool.local_rows(torch.as_tensor(locs, device=pool.device).flatten())
    kept = rows[owned]
    buffers = pool_buffers(pool)
    _sync(pool.device)
    tensors = [buf[kept].to("cpu", copy=True) for buf in buffers]
    return HelixKVBackup(owned.cpu(), tensors, pool.kvp, pool.kvp_rank)


def restore(pool, backup: HelixKVBackup, locs: torch.Tensor) -> None:
    """Write `backup` into the rows of logical `locs` [n] (the request's new pages) on this rank.

    Raises HelixRetractionError when the backup is another rank's, the token count differs, or
    the new locs give this rank other tokens than the old ones (page colors not preserved)."""
    if not isinstance(backup, HelixKVBackup):
        raise HelixRetractionError(
            f"a retraction backup of type {type(backup).__name__} reached a Helix pool; Helix "
            f"decode supports --disaggregation-decode-retraction-backup {HELIX_RETRACTION_BACKUP} "
            "(or none)")
    if (backup.kvp, backup.kvp_rank) != (pool.kvp, pool.kvp_rank):
        raise HelixRetractionError(f"retraction backup of KVP rank {backup.kvp_rank}/{backup.kvp} "
                                   f"restored on KVP rank {pool.kvp_rank}/{pool.kvp}")
    locs = torch.as_tensor(locs, device=pool.device).flatten()
    if locs.numel() != backup.num_tokens:
        raise HelixRetractionError(f"retraction restore of {locs.numel()} tokens, backup holds "
                                   f"{backup.num_tokens}")
    rows, owned = pool.local_rows(locs)
    if not torch.equal(owned.cpu(), backup.owned):
        raise HelixRetractionError(
            "retraction restore: the new pages are not colored like the retracted ones (logical "
            f"page j must get a page id of color j % KVP = j % {pool.kvp}); the request's KV "
            "would land on the wrong KVP rank. Allocate restored requests with the Helix "
            "allocator's alloc_extend from position 0")
    kept = rows[owned]
    buffers = pool_buffers(pool)
    if len(backup.tensors) != len(buffers):
        raise HelixRetractionError(f"retraction backup has {len(backup.tensors)} buffers, the "
                                   f"pool {len(buffers)}")
    _sync(pool.device)
    for buf, saved in zip(buffers, backup.tensors):
        buf[kept] = saved.to(buf.device)
    _sync(pool.device)
