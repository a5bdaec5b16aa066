"""HOP-B: overlap one batch slice's exchange with the next slice's partial attention.

Timeline for 3 slices (A = partial attention, X = exchange, M = merge):

    A0 | X0 start | A1 | X1 start | M0 (wait X0) | A2 | X2 start | M1 | M2

Every rank of a KVP group derives the same slice bounds from the same batch, so the collectives
are issued in the same order everywhere. Slicing only regroups batch rows: every row goes through
the same per-row arithmetic, so the result equals the unsliced path (bitwise for a2a).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .comm import HelixExchange
from .sharding import shard_bounds

PartialFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def slice_bounds(batch_size: int, slices: int | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-empty [start, stop) slices tiling [0, batch_size).

    slices: a count (near-equal split via layout.shard_bounds; counts > batch_size leave empty
    pieces, which are dropped) or explicit bounds (e.g. precomputed by HelixDecodeMetadata.plan).
    """
    if isinstance(slices, int):
        bounds = shard_bounds(batch_size, slices)
    else:
        bounds = [(int(a), int(b)) for a, b in slices]
        _check_tiling(bounds, batch_size)
    return [(a, b) for a, b in bounds if b > a]


def _check_tiling(bounds: list[tuple[int, int]], batch_size: int) -> None:
    pos = 0
    for a, b in bounds:
        if a != pos or b < a:
            raise ValueError(f"HOP-B slices {bounds} do not tile [0, {batch_size}) in order")
        pos = b
    if pos != batch_size:
        raise ValueError(f"HOP-B slices {bounds} do not cover [0, {batch_size})")


def run_hopb(
    partial_fn: PartialFn,
    exchange: HelixExchange,
    batch_size: int,
    slices: int | Sequence[tuple[int, int]] = 1,
) -> torch.Tensor:
    """Partial attention + exchange + merge for a batch, pipelined over HOP-B slices.

    partial_fn(start, stop) -> (out [stop-start, Hl, Dv], lse [stop-start, Hl] fp32) for that
    batch slice. Returns [batch_size, Hl/KVP, Dv] in out's dtype. slices=1 is the plain path.
    """
    bounds = slice_bounds(batch_size, slices)
    if not bounds:  # empty batch: no collective on any rank (they all see B == 0)
        out, _ = partial_fn(0, 0)
        return out.new_empty(0, out.shape[1] // exchange.kvp, out.shape[2])
    merged, in_flight = [], None
    for start, stop in bounds:
        out, lse = partial_fn(start, stop)  # overlaps with the previous slice's exchange
        pending = exchange.start(out, lse)
        if in_flight is not None:
            merged.append(in_flight.merge())
        in_flight = pending
    merged.append(in_flight.merge())
    return merged[0] if len(merged) == 1 else torch.cat(merged, dim=0)
