"""CPU-engine fix for SGLang 0.5.23's HiCache (`--enable-hierarchical-cache`), Helix on or off.

Why: SGLang's CPU engine cannot build or use a HiCache host pool:

- the host pool pins its buffers with `cudaHostRegister` (`pool_host/common.py`
  `_cuda_host_register` -> torch.cuda -> "Found no NVIDIA driver");
- every host <-> device copy is an sgl-kernel CUDA op (`sgl_kernel.kvcacheio.transfer_kv_*` or
  the JIT HiCache kernels), imported only on CUDA / ROCm / XPU: on CPU the names are undefined
  (`NameError: transfer_kv_all_layer_lf_pf`).

What: on the CPU engine the "device" pool already is host memory, so

- host pools are built unpinned (`pin_memory=False`: nothing to register);
- the MHA (also K/V-asymmetric) and MLA host pools' two transfer methods
  (`backup_from_device_all_layer`: every layer of some device rows into host rows;
  `load_to_device_per_layer`: one layer back) are exact torch index copies between each layer's
  device buffer and the host buffer's view of that layer in its layout (`layer_first`:
  [layer][token]; `page_first`: [token][layer]; `page_first_direct`: [page][layer][offset]),
  whatever `--hicache-io-backend` says: the bytes are copied as stored, fp8 pages included.
  Other host layouts (`page_head`, `page_unified`, `page_first_kv_split`), packed speculative
  draft layers and layer-sharded MLA pools are refused when the host pool is built, naming the
  flag.

Inert on GPU: the rows of fix "hicache" (srt.cpu.fixes) are installed on the CPU engine only,
and a pool whose device buffers are not CPU tensors goes to SGLang's method unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

CPU_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


class HiCacheCpuError(RuntimeError):
    """A HiCache host-pool setting the CPU engine has no copy path for."""


def _around_host_kv_init(original: Callable, pool: Any, *args: Any, **kwargs: Any) -> None:
    """HostKVCache.__init__ with pin_memory=False where CUDA is absent (nothing to register); a
    KV host pool without a CPU copy path is refused here, at launch (an error inside a transfer
    would surface as SGLang's `Stream.synchronize` AttributeError on CPU)."""
    if torch.cuda.is_available():
        return original(pool, *args, **kwargs)
    kwargs["pin_memory"] = False
    original(pool, *args, **kwargs)
    if hasattr(pool, "target_layer_num"):  # the MHA / MLA KV host pools (set before this init)
        _check_cpu_pool(pool)
    return None


def layer_view(pool: Any, buffer: torch.Tensor, layer: int) -> torch.Tensor:
    """One layer of a host buffer in the pool's layout: token rows [size, ...] (layer_first:
    buffer[layer]; page_first: buffer[:, layer]) or pages [pages, P, ...] (page_first_direct:
    buffer[:, layer])."""
    return buffer[layer] if pool.layout == "layer_first" else buffer[:, layer]


def host_rows(pool: Any, indices: torch.Tensor):
    """The index of host token rows `indices` [n] into a layer view of the pool's layout."""
    indices = indices.to(torch.int64)
    if pool.layout == "page_first_direct":
        return indices // pool.page_size, indices % pool.page_size
    return (indices,)


def _layer_pairs(pool: Any, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(device buffer, host layer view) pairs of one layer: K and V of an MHA host pool, the
    latent of an MLA one."""
    if hasattr(pool, "device_k_buffers"):
        return [(pool.device_k_buffers[layer], layer_view(pool, pool.k_buffer, layer)),
                (pool.device_v_buffers[layer], layer_view(pool, pool.v_buffer, layer))]
    return [(pool.device_kv_buffers[layer], layer_view(pool, pool.kv_buffer, layer))]


def _check_cpu_pool(pool: Any) -> None:
    if pool.layout not in CPU_LAYOUTS:
        raise HiCacheCpuError(f"--hicache-mem-layout {pool.layout}: the CPU engine copies HiCache "
                              f"pages by torch for {', '.join(CPU_LAYOUTS)}; use one of them")
    if pool.layer_num != pool.target_layer_num or getattr(pool, "_layer_shard_enabled", False):
        raise HiCacheCpuError("HiCache host pools with packed speculative draft layers or "
                              "layer-sharded MLA pools have no CPU copy path: drop "
                              "--enable-hierarchical-cache or the speculative / layer-shard flags")


def _on_cpu(pool: Any) -> bool:
    buffers = getattr(pool, "device_k_buffers", None) or getattr(pool, "device_kv_buffers", ())
    return bool(buffers) and buffers[0].device.type == "cpu"


def _same_bytes(host: torch.Tensor, device: torch.Tensor) -> torch.Tensor:
    """The device rows as the host buffer's dtype, bit for bit (fp8 pages may be stored as uint8
    on one side)."""
    return device if device.dtype == host.dtype else device.view(host.dtype)


def backup_all_layers(pool: Any, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
    """Every layer's device rows `device_indices` [n] -> host rows `host_indices` [n]."""
    _check_cpu_pool(pool)
    rows, device_indices = host_rows(pool, host_indices), device_indices.to(torch.int64)
    for layer in range(pool.layer_num):
        for device, host in _layer_pairs(pool, layer):
            host[rows] = _same_bytes(host, device[device_indices])


def load_one_layer(pool: Any, host_indices: torch.Tensor, device_indices: torch.Tensor,
                   layer: int) -> None:
    """Layer `layer`'s host rows `host_indices` [n] -> device rows `device_indices` [n]."""
    _check_cpu_pool(pool)
    rows, device_indices = host_rows(pool, host_indices), device_indices.to(torch.int64)
    for device, host in _layer_pairs(pool, layer):
        device[device_indices] = _same_bytes(device, host[rows])


def _around_backup(original: Callable, pool: Any, device_pool: Any, host_indices: torch.Tensor,
                   device_indices: torch.Tensor, io_backend: str, *args: Any, **kwargs: Any):
    if not _on_cpu(pool):
        return original(pool, device_pool, host_indices, device_indices, io_backend, *args, **kwargs)
    backup_all_layers(pool, host_indices, device_indices)
    return None


def _around_load(original: Callable, pool: Any, device_pool: Any, host_indices: torch.Tensor,
                 device_indices: torch.Tensor, layer_id: int, io_backend: str, *args: Any,
                 is_draft: bool = False, **kwargs: Any):
    if not _on_cpu(pool):
        return original(pool, device_pool, host_indices, device_indices, layer_id, io_backend,
                        *args, is_draft=is_draft, **kwargs)
    if is_draft or not 0 <= layer_id < pool.target_layer_num:
        return None  # SGLang's pools skip such layers the same way (no draft layers here)
    load_one_layer(pool, host_indices, device_indices, layer_id)
    return None
