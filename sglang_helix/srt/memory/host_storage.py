"""The HiCache storage tier with Helix (`--hicache-storage-backend file`): each KVP rank writes and
reads only the pages it stores.

SGLang 0.5.23 backs host pages up into a storage backend by the page's hash-chain key and, for a
request whose prefix is on neither device nor host, asks every rank whether the keys exist (one
MIN across the ranks), reads the hit pages into freshly allocated host pages and inserts them
into the radix tree. Its `file` backend writes one file per key and TP rank, or one shared file
for MLA (whose latent every rank stores whole). Under Helix a page lives on one KVP rank only:

- the storage config is the per-rank one for MLA too (no shared MLA file, every rank writes), and
  the keys carry the Helix layout (`helix-kvpN`: the host pool's storage format tag), so a Helix
  server never reads a Helix-off file or one of another KVP size;
- a host page another rank stores reads as an empty page (srt.memory.host_pool); `HelixFileStorage`
  writes nothing for it, so each rank's files are its own pages (1/KVP of the bytes);
- a key exists for the KVP group when the file of any rank of its KVP group (same TPA rank)
  exists: the page's owner wrote it (its color is fixed by its position, which the hash chain
  fixes), so every rank answers the same and the MIN across ranks is the group's hit;
- reading, a rank reads its own file; a key only another rank of the group stored is another
  rank's page: the read succeeds without data and the host pool drops it;
- host pages for a storage hit take the colors of their logical positions, cyclic from the first
  prefetched page (SGLang records where the prefetched span starts: `storage_start`).

Other backends are refused at launch (rules.features) and here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import torch

from .host_hooks import helix_host_pool
from .host_pool import HelixHostPool
from .pools import HelixPoolError

HELIX_STORAGE_BACKENDS = ("file",)


def _file_base():
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile

    return HiCacheFile


def rank_file_suffix(model_name: Optional[str], tp_rank: int, tp_size: int, shard_suffix: str = "") -> str:
    """The file-name suffix SGLang's file backend gives TP rank `tp_rank`'s own (non-MLA) pages."""
    model = "-".join(model_name.split("/")) if model_name else ""
    return f"_{model}_{tp_rank}_{tp_size}{shard_suffix}"


class HelixFileStorage(_file_base()):
    """SGLang's file backend for one Helix rank: own pages in own files, existence per KVP group.

    storage_config: SGLang's HiCacheStorageConfig (per-rank: is_mla_model False; tp_rank is the
    Helix rank g = tpa_rank * KVP + kvp_rank); kvp, kvp_rank: the rank's KVP shard.
    """

    def __init__(self, storage_config: Any, kvp: int, kvp_rank: int):
        if storage_config.is_mla_model:
            raise HelixPoolError("Helix storage files are per rank: the storage config must not "
                                 "share MLA files")
        super().__init__(storage_config)
        own = rank_file_suffix(storage_config.model_name, storage_config.tp_rank,
                               storage_config.tp_size)
        if not self.tp_config_suffix.startswith(own):
            raise HelixPoolError(f"SGLang's file backend names rank files {self.tp_config_suffix!r}, "
                                 f"not {own!r}...: an SGLang version this plugin does not know")
        shard = self.tp_config_suffix[len(own):]
        first = storage_config.tp_rank - kvp_rank
        self.group_suffixes = tuple(
            rank_file_suffix(storage_config.model_name, first + r, storage_config.tp_size, shard)
            for r in range(kvp))

    def _group_has(self, key: str) -> bool:
        return any(os.path.exists(os.path.join(self.file_path, f"{key}{suffix}.bin"))
                   for suffix in self.group_suffixes)

    def exists(self, key: str) -> bool:
        """The page of `key` is stored by its owner (any rank of this KVP group)."""
        return super().exists(key) or self._group_has(key)

    def get(self, key: str, target_location: torch.Tensor, target_sizes: Any = None):
        """This rank's page into target_location; another rank's stored page: the target as is
        (the host pool drops it); a missing page: None."""
        if super().exists(key):
            return super().get(key, target_location, target_sizes)
        return target_location if self._group_has(key) else None

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Write this rank's page; another rank's page (an empty value) writes nothing."""
        if value is not None and value.numel() == 0:
            return True
        return super().set(key, value, target_location, target_sizes)

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        if pool_transfers:
            raise HelixPoolError("HiCache storage of side pools (speculative / hybrid models) is not "
                                 "supported with Helix: drop --hicache-storage-backend")
        from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransferResult

        pages = self.batch_exists(keys, extra_info)
        return PoolTransferResult(pages, {PoolName.KV: pages} if pages else {}, list(range(1, pages + 1)))


def _around_generate_storage_config(original: Callable, controller: Any, *args: Any, **kwargs: Any):
    config = original(controller, *args, **kwargs)
    if helix_host_pool(controller) is None:
        return config
    return dataclasses.replace(config, is_mla_model=False)  # one rank's pages per file


def _around_create_builtin_backend(original: Callable, factory: Any, backend_name: str, backend_class: Any,
                                   storage_config: Any, mem_pool_host: Any):
    if not isinstance(mem_pool_host, HelixHostPool):
        return original(factory, backend_name, backend_class, storage_config, mem_pool_host)
    if backend_name not in HELIX_STORAGE_BACKENDS:
        raise HelixPoolError(f"--hicache-storage-backend {backend_name}: Helix stores HiCache pages "
                             f"per KVP rank with the file backend only; use --hicache-storage-backend "
                             f"file")
    return HelixFileStorage(storage_config, mem_pool_host.kvp, mem_pool_host.kvp_rank)


def _around_alloc_prefetch_host_buffers(original: Callable, controller: Any, operation: Any,
                                        need_size: int, *args: Any, **kwargs: Any):
    pool = helix_host_pool(controller)
    if pool is None:
        return original(controller, operation, need_size, *args, **kwargs)
    first_page = operation.storage_start // pool.page_size
    return controller.mem_pool_host.alloc(need_size, start_owner=first_page % pool.kvp)
