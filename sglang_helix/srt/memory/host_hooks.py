"""HiCache with Helix: the hook functions of the HiCache rows of srt.hook_table.

SGLang 0.5.23 builds the host pool, allocates host pages for a backup and device pages for a
load-back in three places; each hook calls straight through unless the pool is Helix's:

- `build_kv_host_pool` (hybrid_pool_assembler): SGLang's native host pool, built from this
  rank's Helix device buffers, is wrapped in a `HelixHostPool` (colored host ids,
  srt.memory.host_pool), so SGLang's controller takes its KV-sharded path;
- `HybridCacheController.allocate_host_transfers` (a backup: write-through after a prefill, or
  write-back when the device evicts): the host pages get the colors of the device pages they
  back up. The colors are read off the device page ids (host ints: free on the CPU engine, one
  small device-to-host read per backup on GPU, as SGLang's `direct` io backend does for its
  indices);
- `HybridCacheController.load` (a host hit loaded back): the device pages get the colors of the
  host pages (the Helix allocator's `alloc_colored_pages`), so each reloaded page lands on the
  KVP rank its logical position gives it; SGLang's position-less `alloc(n)` is never reached;
- `HybridCacheController.alloc_prefetch_host_buffers` (the storage tier: pages read from
  `--hicache-storage-backend` into host pages): the host pages get the colors of their logical
  positions, cyclic from the first prefetched page (srt.memory.host_storage).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ...sharding import locs_of_page_ids, page_ids_of_locs, page_owner
from .allocator import HelixPagedAllocator
from .host_pool import HelixHostPool
from .pools import HelixPoolError, _HelixPoolMixin


def helix_host_pool(controller: Any) -> Optional[HelixHostPool]:
    """The controller's anchor host pool if it is a Helix one (None: Helix off)."""
    group = getattr(controller, "mem_pool_host", None)
    entry = getattr(group, "anchor_entry", None)
    pool = getattr(entry, "host_pool", group)
    return pool if isinstance(pool, HelixHostPool) else None


def page_colors(locs: torch.Tensor, page_size: int, kvp: int) -> torch.Tensor:
    """Colors [n // P] (host int64) of the whole pages of token locs [n], device or host ids."""
    return page_owner(page_ids_of_locs(locs.cpu(), page_size), kvp)


def _around_build_kv_host_pool(original: Callable, *args: Any, **kwargs: Any):
    host_pool = original(*args, **kwargs)
    kv_pool = kwargs.get("kv_pool")
    if not isinstance(kv_pool, _HelixPoolMixin):
        return host_pool
    if host_pool.page_size != kv_pool.page_size:
        raise HelixPoolError(f"HiCache host pages of {host_pool.page_size} tokens behind Helix "
                             f"device pages of {kv_pool.page_size}: they must be equal")
    return HelixHostPool(host_pool, kv_pool.kvp, kv_pool.kvp_rank)


def _around_allocate_host_transfers(original: Callable, controller: Any, device_indices: torch.Tensor,
                                    *args: Any, **kwargs: Any):
    pool = helix_host_pool(controller)
    if pool is not None:  # the device pages' colors, whatever phase the tree supplies
        kwargs["start_owner"] = page_colors(device_indices, pool.page_size, pool.kvp)
    return original(controller, device_indices, *args, **kwargs)


def _device_allocator(controller: Any) -> HelixPagedAllocator:
    allocator = controller.mem_pool_device_allocator
    allocator = getattr(allocator, "full_attn_allocator", allocator)
    if not isinstance(allocator, HelixPagedAllocator):
        raise HelixPoolError(f"a Helix HiCache host pool behind a {type(allocator).__name__}, not "
                             f"the Helix allocator: drop --enable-hierarchical-cache")
    return allocator


def _around_load(original: Callable, controller: Any, host_indices: torch.Tensor, *args: Any,
                 device_indices: Optional[torch.Tensor] = None, **kwargs: Any):
    """Load-back: device pages of the host pages' colors (None if some color is short)."""
    pool = helix_host_pool(controller)
    if pool is None or device_indices is not None or host_indices.numel() == 0:
        return original(controller, host_indices, *args, device_indices=device_indices, **kwargs)
    allocator = _device_allocator(controller)
    ids = allocator.alloc_colored_pages(page_colors(host_indices, pool.page_size, pool.kvp))
    if ids is None:
        return None
    locs = locs_of_page_ids(ids, pool.page_size)
    loaded = original(controller, host_indices, *args, device_indices=locs, **kwargs)
    if loaded is None:  # caller-owned device pages stay ours on failure
        allocator.free(locs)
    return loaded
