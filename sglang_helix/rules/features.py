"""Server features and Helix: what a Helix launch refuses among SGLang's parallelisms, caches,
schedulers, devices and attention backends (each message names the flag and the fix), and what
of HiCache it serves.

Served with Helix (no refusal): HiCache (check_hicache), pipeline parallel (each stage's TP group is its own Helix group),
DP attention on MLA models (each DP-attention group of --tp-size / D ranks is one Helix group),
DP replicas (--dp-size: one Helix group each), mixed chunked prefill (decode rows ride in the
chunk's batch as 1-token extends over their KV-sharded prefix, one exchange for the batch).

Attention backends with a Helix path (the backends whose decode kernels give partial output +
LSE; Helix serves prefill and decode with its own "helix" backend on top of them; unset means
"let SGLang pick", checked again once resolved):
  cpu:  torch_native, triton (TRITON_INTERPRET). Not intel_amx: it needs the real CPU sgl-kernel.
  cuda: triton, flashinfer, fa3 (MHA/GQA and MLA); flashmla, trtllm_mla (MLA only).
"""

from __future__ import annotations

from collections.abc import Mapping

from .flags import HelixServerArgs
from .model import ModelInfo
from .refusal import refuse
from .server import ServerLayout

HELIX_ATTENTION_BACKENDS: Mapping[str, frozenset[str]] = {
    "cpu": frozenset({"torch_native", "triton"}),
    "cuda": frozenset({"triton", "flashinfer", "fa3", "flashmla", "trtllm_mla"}),
}
MLA_ONLY_BACKENDS = frozenset({"flashmla", "trtllm_mla"})
MODEL_LESS_PATHS = ("none", "dummy")  # SGLang's model-less server


def check_parallelism(server: ServerLayout) -> None:
    """Helix shards each attention TP group (a pipeline stage's TP group, or one DP-attention
    group of --tp-size / D ranks); SGLang's other ways of splitting attention are refused."""
    if server.dcp_size > 1:
        refuse(f"--dcp-size {server.dcp_size}: SGLang's decode context parallel and Helix both shard "
               "the KV cache; use one of them (drop --dcp-size, Helix's KVP replaces it)")
    if server.enable_prefill_cp:
        refuse("--enable-prefill-cp is not supported with Helix; drop --enable-prefill-cp")
    if server.attn_cp_size > 1:
        refuse(f"--attn-cp-size {server.attn_cp_size}: not supported with Helix; drop --attn-cp-size")
    dpa = server.attention_dp_size
    if dpa > 1 and server.tp_size % dpa:
        refuse(f"--attn-dp-size {dpa} does not divide --tp-size {server.tp_size}: each DP-attention "
               f"group is one Helix group of --tp-size / {dpa} ranks; pick a divisor of --tp-size")


def check_attention_dp(server: ServerLayout, model: ModelInfo) -> None:
    """DP attention with Helix: DeepSeek MLA (the layout SGLang runs it for). SGLang's Llama /
    Qwen2 attention shards over the whole TP group, not the attention TP group, and Helix's GQA
    layers are verified only at attention TP = --tp-size, so GQA is refused."""
    dpa = server.attention_dp_size
    if dpa > 1 and not model.is_mla:
        refuse(f"--attn-dp-size {dpa} (or --enable-dp-attention --dp-size {dpa}) with the GQA model "
               f"{model.architecture}: Helix runs DP attention for DeepSeek MLA models only; drop DP "
               f"attention (--dp-size {dpa} replicas, each its own Helix group, serve GQA)")


def check_scheduling(server: ServerLayout) -> None:
    """Caches and batch shapes the helix backend and pools do not serve."""
    check_hicache(server)
    check_chunked_prefill(server.chunked_prefill_size)


HICACHE_STORAGE_BACKENDS = ("file",)  # the storage tiers Helix keeps per KVP rank


def check_hicache(server: ServerLayout) -> None:
    """HiCache (--enable-hierarchical-cache) serves with Helix: the host tier per KVP rank
    (srt.memory.host_pool), write-through or write-back, and the `file` storage tier. Refused:
    other storage backends, the buffer-only host mode, and speculative decoding with HiCache."""
    if not server.enable_hierarchical_cache:
        return
    flag = "--enable-hierarchical-cache"
    backend = server.hicache_storage_backend
    if backend is not None and backend not in HICACHE_STORAGE_BACKENDS:
        refuse(f"{flag} with --hicache-storage-backend {backend}: Helix writes each KVP rank's "
               f"HiCache pages with the {' / '.join(HICACHE_STORAGE_BACKENDS)} backend only; use "
               f"--hicache-storage-backend {HICACHE_STORAGE_BACKENDS[0]} or drop it")
    if server.hicache_host_memory_mode != "cache":
        refuse(f"{flag} with --hicache-host-memory-mode {server.hicache_host_memory_mode}: the "
               f"staging-only host mode allocates host pages without their KVP owners; use "
               f"--hicache-host-memory-mode cache")
    if server.speculative_algorithm is not None:
        refuse(f"{flag} with --speculative-algorithm {server.speculative_algorithm}: HiCache "
               f"under Helix backs up the target's pages only (no draft KV, no verify tested "
               f"against host hits); drop one of the two flags")


def check_chunked_prefill(chunked_prefill_size: int | None) -> None:
    """Refuse an explicitly disabled chunked prefill (--chunked-prefill-size <= 0): a long prompt
    would run as one forward, its activations and KV writes growing with the whole prompt.
    None (not given) is fine: SGLang then picks a bounded default for the device."""
    if chunked_prefill_size is not None and int(chunked_prefill_size) <= 0:
        refuse(f"--chunked-prefill-size {chunked_prefill_size} disables chunked prefill, so a long "
               "prompt is prefilled in one forward; give a positive size (e.g. 8192) or leave the "
               "flag out for SGLang's default")


def check_model_path(server: ServerLayout) -> None:
    """Helix reads the heads it shards from the model's config.json."""
    if server.model_path is not None and str(server.model_path).lower() in MODEL_LESS_PATHS:
        refuse("--enable-helix needs a real --model-path (its config.json gives the heads Helix "
               "shards); drop --enable-helix for a model-less server")


def check_device(helix: HelixServerArgs, server: ServerLayout) -> None:
    """nvshmem is a CUDA exchange."""
    if helix.helix_comm_backend == "nvshmem" and (server.device or "cuda") != "cuda":
        refuse(f"--helix-comm-backend nvshmem needs CUDA (device={server.device!r}); "
               "use --helix-comm-backend a2a")


def check_attention_backends(server: ServerLayout, model: ModelInfo) -> None:
    """Every attention backend given (or resolved) must have a Helix path on the device."""
    device = server.device or "cuda"
    allowed = HELIX_ATTENTION_BACKENDS.get(device)
    if allowed is None:
        refuse(f"--device {device}: Helix runs on {', '.join(HELIX_ATTENTION_BACKENDS)} only")
    if not model.is_mla:
        allowed = allowed - MLA_ONLY_BACKENDS
    for flag, backend in (("--attention-backend", server.attention_backend),
                          ("--prefill-attention-backend", server.prefill_attention_backend),
                          ("--decode-attention-backend", server.decode_attention_backend)):
        if backend is not None and backend not in allowed:
            refuse(f"{flag} {backend}: no Helix path for this backend on {device}"
                   f"{'' if model.is_mla else ' with GQA'}; use {flag} {' or '.join(sorted(allowed))}")
