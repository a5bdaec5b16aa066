"""Accelerators as data: per-GPU datasheet figures (dense tensor FLOP/s at BF16 / FP8 / FP4, HBM
bandwidth and capacity, NVLink bandwidth, NVLink domain), each with its source address.

Datasheets quote tensor throughput with 2:4 sparsity; the model uses dense = half of it. Figures
that are not datasheet numbers are marked ASSUMPTION. The "cpu" hardware is measured on this
machine (probe.py), not specified here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .specs import PRECISION_BYTES, SpecError, check_numbers


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (per-GPU figures) and the links between accelerators.

    flops: dense FLOP/s per precision; a precision the chip cannot compute natively is absent.
    link_bw: bytes/s per direction per GPU inside the scale-up domain (NVLink).
    link_latency: seconds per collective step inside the domain (ASSUMPTION for GPUs, see below).
    scaleout_bw / scaleout_latency: the same beyond `domain_size` GPUs (one NIC per GPU).
    attn_precision: if set, attention math runs at this precision's rate whatever the KV dtype
        (the CPU torch path upcasts to fp32).
    sources: where each figure comes from (addresses).
    """

    name: str
    flops: dict = field(hash=False)
    hbm_bw: float
    hbm_capacity: float
    link_bw: float
    link_latency: float
    domain_size: int
    scaleout_bw: float
    scaleout_latency: float
    attn_precision: str | None = None
    source: str = ""
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_numbers(self, ("hbm_bw", "hbm_capacity", "link_bw", "domain_size", "scaleout_bw"))
        check_numbers(self, ("link_latency", "scaleout_latency"), allow_zero=("link_latency", "scaleout_latency"))
        if not self.flops:
            raise SpecError(f"{self.name}: flops needs at least one precision")
        for prec, rate in self.flops.items():
            if prec not in PRECISION_BYTES or not rate > 0:
                raise SpecError(f"{self.name}: flops[{prec!r}] = {rate!r} (precision or rate invalid)")
        if self.attn_precision is not None and self.attn_precision not in self.flops:
            raise SpecError(f"{self.name}: attn_precision {self.attn_precision!r} has no flops entry")

    def flop_rate(self, precision: str) -> float:
        """Dense FLOP/s at `precision`; SpecError if the chip has no such tensor path."""
        if precision not in self.flops:
            raise SpecError(
                f"{self.name} has no {precision} compute (has {', '.join(sorted(self.flops))}); "
                f"pick --precision {' or '.join(sorted(p for p in self.flops if p != 'fp32'))}"
            )
        return self.flops[precision]

    def link(self, group: int) -> tuple[float, float, int]:
        """(bandwidth bytes/s per direction, latency s per step, steps) of a collective over
        `group` GPUs: one switch traversal inside the NVLink domain, ceil(log2 n) beyond it."""
        if group <= self.domain_size:
            return self.link_bw, self.link_latency, 1
        return self.scaleout_bw, self.scaleout_latency, math.ceil(math.log2(group))


_T, _G, _US = 1e12, 1e9, 1e-6
_NVL5, _NVL4 = 900 * _G, 450 * _G  # per direction: NVLink 5 1.8 TB/s, NVLink 4 900 GB/s bidirectional
# ASSUMPTION (all GPUs): one collective step inside the NVLink domain costs 1 us (switch hop +
# synchronisation, small messages, CUDA graphs); beyond the domain 5 us per step over one
# 400 Gb/s (50 GB/s) NIC per GPU.
_LAT, _NIC, _NIC_LAT = 1 * _US, 50 * _G, 5 * _US

_GB300 = ("https://verda.com/blog/gb300-nvl72-architecture (per-GPU dense table)",
          "https://vendordeep.com/report/nvidia-launches-blackwell-ultra-gb300 (NVL72 datasheet summary)")
_GB200 = ("https://glennklockwood.com/garden/processors/B200 (GB200 variant of B200, 1,200 W)",
          "https://aiwiki.ai/wiki/nvidia_gb200_nvl72/raw (NVL72: 13.4 TB HBM3e, 130 TB/s NVLink)")
_B200 = ("https://glennklockwood.com/garden/processors/B200 (HGX variant, 1,000 W)",
         "https://brent-newsom-nvidia.github.io/AIPS-Boom/wiki/NVIDIA-DGX-B200 (DGX B200: 1,440 GB, "
         "64 TB/s, FP4 144 PF sparse / 72 PF dense per 8 GPUs)")
_HOPPER = ("https://lzwjava.github.io/nvidia-h200-gpu-specs-en (H100/H200 SXM: FP8 3,958 TF with "
           "sparsity, 3.35 / 4.8 TB/s, 80 / 141 GB, NVLink 900 GB/s)",
           "https://glennklockwood.com/garden/processors/h100 (dense BF16 989.4 TF, FP8 1,978.9 TF)")

HARDWARE: dict[str, HardwareSpec] = {
    # GB300 NVL72 (Blackwell Ultra): dense FP4 15 PF, FP8 5 PF, BF16 2.5 PF per GPU; 288 GB HBM3e
    # (279 GB usable per the per-GPU table), 8 TB/s (576 TB/s per rack); 72-GPU NVLink 5 domain.
    "gb300": HardwareSpec("gb300", {"fp4": 15e15, "fp8": 5e15, "bf16": 2.5e15}, 8 * _T, 279 * _G,
                          _NVL5, _LAT, 72, _NIC, _NIC_LAT, source="GB300 NVL72 datasheet", sources=_GB300),
    # GB200 NVL72: dense FP4 10 PF, FP8 5 PF, BF16 2.5 PF per GPU (1,440 / 720 / 360 PF sparse per
    # rack); 13.4 TB HBM3e per rack = 186 GB per GPU; 8 TB/s (the paper's 8000 GB/s).
    "gb200": HardwareSpec("gb200", {"fp4": 10e15, "fp8": 5e15, "bf16": 2.5e15}, 8 * _T, 186 * _G,
                          _NVL5, _LAT, 72, _NIC, _NIC_LAT, source="GB200 NVL72 datasheet", sources=_GB200),
    # HGX / DGX B200: dense FP4 9 PF, FP8 4.5 PF, BF16 2.25 PF per GPU; 180 GB, 8 TB/s; 8-GPU domain.
    "b200": HardwareSpec("b200", {"fp4": 9e15, "fp8": 4.5e15, "bf16": 2.25e15}, 8 * _T, 180 * _G,
                         _NVL5, _LAT, 8, _NIC, _NIC_LAT, source="HGX B200 datasheet", sources=_B200),
    # H200 SXM: dense FP8 1,979 TF, BF16 989 TF, no FP4; 141 GB HBM3e, 4.8 TB/s; 8-GPU NVLink 4.
    "h200": HardwareSpec("h200", {"fp8": 1979 * _T, "bf16": 989 * _T}, 4.8 * _T, 141 * _G,
                         _NVL4, _LAT, 8, _NIC, _NIC_LAT, source="H200 SXM datasheet", sources=_HOPPER),
    # H100 SXM: dense FP8 1,979 TF, BF16 989 TF, no FP4; 80 GB HBM3, 3.35 TB/s; 8-GPU NVLink 4.
    "h100": HardwareSpec("h100", {"fp8": 1979 * _T, "bf16": 989 * _T}, 3.35 * _T, 80 * _G,
                         _NVL4, _LAT, 8, _NIC, _NIC_LAT, source="H100 SXM datasheet", sources=_HOPPER),
}
HARDWARE_CHOICES = tuple(HARDWARE) + ("cpu",)


def get_hardware(name: str) -> HardwareSpec:
    """Hardware spec by name (datasheet figures). "cpu" is measured, not specified: use
    sglang_helix.perf.probe.cpu_hardware()."""
    if name == "cpu":
        raise SpecError("hardware 'cpu' is measured on this machine: call "
                        "sglang_helix.perf.probe.cpu_hardware()")
    if name not in HARDWARE:
        raise SpecError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE_CHOICES)}")
    return HARDWARE[name]
