"""`no_host_sync()`: fail on anything in a block that would stall a GPU stream or break a CUDA graph.

A CPU proxy for "the decode run path is capture-safe": under a TorchDispatchMode every aten op is
checked, and ops that read a tensor's value on the host (`_local_scalar_dense`, behind `.item()`,
`int(t)`, `bool(t)`), ops whose output shape depends on tensor data (`nonzero`, `masked_select`,
`unique`, boolean-mask indexing, ...) and copies from a CUDA tensor to the host raise `HostSyncError`. `Tensor.tolist`,
`Tensor.numpy` and `Tensor.__array__` read CPU memory without dispatching, so they are patched to
raise for the duration of the block as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import HelixError

HOST_READS = frozenset({"aten._local_scalar_dense.default", "aten.item.default",
                        "aten.is_nonzero.default", "aten.equal.default"})
DATA_DEPENDENT_SHAPES = frozenset({
    "aten.nonzero.default", "aten.masked_select.default",
    "aten.unique.default", "aten._unique2.default", "aten.unique_consecutive.default",
    "aten.unique_dim.default", "aten.repeat_interleave.Tensor", "aten.argwhere.default",
    "aten.masked_scatter.default",
})
# Indexing with a boolean mask selects a data-dependent number of elements.
_MASK_INDEXED = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"})
_PATCHED = ("tolist", "numpy", "__array__")


class HostSyncError(HelixError):
    """An op in a block that must not sync with the host (or have data-dependent shapes)."""


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in HOST_READS:
            raise HostSyncError(f"{name} reads a tensor value on the host (a sync)")
        if name in DATA_DEPENDENT_SHAPES:
            raise HostSyncError(f"{name} has a data-dependent output shape")
        if name in _MASK_INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            raise HostSyncError(f"{name} with a boolean mask has a data-dependent shape")
        if name in ("aten._to_copy.default", "aten.copy_.default"):
            _check_copy(name, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _check_copy(name: str, args, kwargs) -> None:
    src = args[1] if name == "aten.copy_.default" else args[0]
    dst_device = args[0].device if name == "aten.copy_.default" else kwargs.get("device")
    if isinstance(src, torch.Tensor) and src.is_cuda and dst_device is not None \
            and torch.device(dst_device).type == "cpu":
        raise HostSyncError(f"{name}: device-to-host copy")


def _raising(attr: str):
    def fail(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{attr}() reads tensor values on the host")

    return fail


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise HostSyncError on any host-syncing or data-dependent-shape op inside the block."""
    saved = {attr: getattr(torch.Tensor, attr) for attr in _PATCHED}
    try:
        for attr in _PATCHED:
            setattr(torch.Tensor, attr, _raising(attr))
        with _Guard():
            yield
    finally:
        for attr, fn in saved.items():
            setattr(torch.Tensor, attr, fn)
