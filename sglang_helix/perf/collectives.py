"""Costs of one kernel and of one collective on one GPU, and the HOP-B overlap (seconds).

    kernel          max(bytes / HBM bandwidth, FLOPs / FLOP rate)
    all-to-all      1 step  + (n-1)/n   * buffer / bw     (buffer = what one rank holds)
    all-reduce      2 steps + 2(n-1)/n  * buffer / bw
    all-gather / reduce-scatter  1 step + (n-1)/n * full buffer / bw
(a step is one switch traversal inside the NVLink domain, ceil(log2 n) of them beyond it;
`latency_scale` multiplies every step, 0 = bandwidth only). Buffers and batches are numpy arrays.
"""

from __future__ import annotations

import numpy as np

from .hardware import HardwareSpec


def kernel(hw: HardwareSpec, nbytes, flops, rate: float):
    """max(memory time, compute time) of one kernel on one GPU."""
    return np.maximum(nbytes / hw.hbm_bw, flops / rate)


def _link(hw: HardwareSpec, n: int, latency_scale: float) -> tuple[float, float]:
    bw, lat, steps = hw.link(n)
    return bw, steps * lat * latency_scale


def all_to_all(hw: HardwareSpec, buffer, n: int, latency_scale: float = 1.0):
    """One all_to_all of `buffer` bytes held per rank over n ranks."""
    if n <= 1:
        return 0.0 * buffer
    bw, lat = _link(hw, n, latency_scale)
    return lat + (n - 1) / n * buffer / bw


def all_reduce(hw: HardwareSpec, buffer, n: int, latency_scale: float = 1.0):
    if n <= 1:
        return 0.0 * buffer
    bw, lat = _link(hw, n, latency_scale)
    return 2 * lat + 2 * (n - 1) / n * buffer / bw


def all_gather(hw: HardwareSpec, full, n: int, latency_scale: float = 1.0):
    """All-gather (or reduce-scatter) whose full, gathered buffer is `full` bytes."""
    if n <= 1:
        return 0.0 * full
    bw, lat = _link(hw, n, latency_scale)
    return lat + (n - 1) / n * full / bw


reduce_scatter = all_gather


def split(collective, hw: HardwareSpec, buffer, n: int, latency_scale: float = 1.0):
    """(latency part, bandwidth part) of one collective."""
    lat = collective(hw, 0.0 * buffer, n, latency_scale)
    return lat, collective(hw, buffer, n, latency_scale) - lat


def hopb_overlap(attn, x_lat, x_bw, slices):
    """Attention + exchange with the batch cut in `slices` pipelined slices (1 = sum).

    Slice i's exchange overlaps slice i+1's attention: a + (s-1) * max(a, x) + x with
    a = attn / s, x = latency + bandwidth part / s (every slice pays the latency).
    """
    s = np.maximum(1.0, slices)
    a, x = attn / s, x_lat + x_bw / s
    return a + (s - 1) * np.maximum(a, x) + x
