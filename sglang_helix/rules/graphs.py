"""Which CUDA-graph phases a Helix launch may capture (srt.resolution turns this into SGLang's
resolved CudaGraphConfig)."""

from __future__ import annotations

from ..config import HelixConfig

PREFILL_GRAPH_REASON = "the helix extend path plans each chunk on the host"


def decode_graph_blocker(cfg: HelixConfig, device: str, speculative: str | None = None) -> str | None:
    """Why Helix decode must run without CUDA graphs here, or None (SGLang may capture it).

    The helix backends plan each batch outside the graph into buffers allocated once and run
    static-shape kernels with no host sync inside (tests/multirank/test_decode_graph_safe.py);
    what has not been shown capture-safe keeps graphs off, with this reason logged.
    """
    if str(device) != "cuda":
        return f"device {device}: SGLang captures CUDA graphs on CUDA only"
    if cfg.hopb_slices > 1:
        return ("--helix-hopb-slices > 1 issues asynchronous collectives inside the step, whose "
                "capture is not verified yet")
    if speculative:
        return (f"--speculative-algorithm {speculative}: the helix backend plans each target-verify "
                "batch on the host (like an extend chunk)")
    if cfg.comm_backend == "nvshmem":
        return "--helix-comm-backend nvshmem (symmetric memory) capture is not verified yet"
    return None
