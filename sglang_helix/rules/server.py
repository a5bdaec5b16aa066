"""`ServerLayout`: the SGLang server settings the rules read, and SGLang's spellings of their flags.

A ServerLayout is read the same way everywhere: off a ServerArgs (or its resolving view) in the
plugin (`ServerLayout.of`), off a launch line's argv in the planner (rules.argv.layout_from_argv,
with SGLANG_FLAGS). The defaults are SGLang 0.5.23's parser defaults, so a flag left off a launch
line reads as SGLang would parse it (tests/srt/test_launch_refusals.py checks both against
SGLang's own parser). None means "not given, SGLang resolves it later" (e.g. the page size,
the attention backend, the NEXTN draft settings).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ServerLayout:
    """The SGLang settings Helix depends on (field names = ServerArgs attributes)."""

    model_path: str | None = None
    device: str | None = None
    tp_size: int = 1
    pp_size: int = 1
    dcp_size: int = 1
    attn_cp_size: int = 1
    attn_dp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    ep_size: int = 1
    enable_prefill_cp: bool = False
    attention_backend: str | None = None
    prefill_attention_backend: str | None = None
    decode_attention_backend: str | None = None
    page_size: int | None = None
    kv_cache_dtype: str | None = "auto"
    chunked_prefill_size: int | None = None
    enable_hierarchical_cache: bool = False
    hicache_storage_backend: str | None = None
    hicache_host_memory_mode: str = "cache"
    enable_mixed_chunk: bool = False
    speculative_algorithm: str | None = None
    speculative_ngram_max_bfs_breadth: int | None = 10
    speculative_eagle_topk: int | None = None
    speculative_num_steps: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_draft_model_path: str | None = None
    disaggregation_mode: str = "null"
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_decode_enable_offload_kvcache: bool = False
    disaggregation_decode_host_receive_threshold: float = 1.0
    disaggregation_decode_retraction_backup: str | None = None

    @property
    def attention_dp_size(self) -> int:
        """DP-attention groups: --attn-dp-size, or SGLang's deprecated spelling --dp-size D
        --enable-dp-attention (which SGLang resolves to attn_dp_size = D, dp_size = 1)."""
        if self.attn_dp_size > 1 or not self.enable_dp_attention:
            return self.attn_dp_size
        return self.dp_size

    @property
    def dp_replicas(self) -> int:
        """Data-parallel replicas of the whole model (--dp-size without DP attention)."""
        return 1 if self.enable_dp_attention and self.attn_dp_size == 1 else self.dp_size

    @property
    def attention_tp_size(self) -> int:
        """Ranks of one attention TP group: --tp-size / the DP-attention groups (what Helix
        shards: KVP x TPA)."""
        return self.tp_size // max(1, self.attention_dp_size)

    @classmethod
    def of(cls, server_args_like: Any) -> ServerLayout:
        """Read every field off a ServerArgs-like object (missing attributes keep the default)."""
        return cls(**{f.name: getattr(server_args_like, f.name, f.default) for f in fields(cls)})


# SGLang 0.5.23's option strings for each ServerLayout field (ServerArgs.add_cli_args), with the
# type its parser converts to (bool: a store_true flag).
SGLANG_FLAGS: tuple[tuple[tuple[str, ...], str, type], ...] = (
    (("--model-path", "--model"), "model_path", str),
    (("--device",), "device", str),
    (("--tp-size", "--tensor-parallel-size"), "tp_size", int),
    (("--pp-size", "--pipeline-parallel-size"), "pp_size", int),
    (("--dcp-size", "--decode-context-parallel-size"), "dcp_size", int),
    (("--attn-cp-size", "--attention-context-parallel-size"), "attn_cp_size", int),
    (("--attn-dp-size", "--attention-data-parallel-size"), "attn_dp_size", int),
    (("--dp-size", "--data-parallel-size"), "dp_size", int),
    (("--enable-dp-attention",), "enable_dp_attention", bool),
    (("--ep-size", "--expert-parallel-size", "--ep"), "ep_size", int),
    (("--enable-prefill-cp",), "enable_prefill_cp", bool),
    (("--attention-backend",), "attention_backend", str),
    (("--prefill-attention-backend",), "prefill_attention_backend", str),
    (("--decode-attention-backend",), "decode_attention_backend", str),
    (("--page-size",), "page_size", int),
    (("--kv-cache-dtype",), "kv_cache_dtype", str),
    (("--chunked-prefill-size",), "chunked_prefill_size", int),
    (("--enable-hierarchical-cache", "--enable-hicache"), "enable_hierarchical_cache", bool),
    (("--hicache-storage-backend",), "hicache_storage_backend", str),
    (("--hicache-host-memory-mode",), "hicache_host_memory_mode", str),
    (("--enable-mixed-chunk",), "enable_mixed_chunk", bool),
    (("--speculative-algorithm",), "speculative_algorithm", str),
    (("--speculative-ngram-max-bfs-breadth",), "speculative_ngram_max_bfs_breadth", int),
    (("--speculative-eagle-topk",), "speculative_eagle_topk", int),
    (("--speculative-num-steps",), "speculative_num_steps", int),
    (("--speculative-num-draft-tokens",), "speculative_num_draft_tokens", int),
    (("--speculative-draft-model-path", "--speculative-draft-model"), "speculative_draft_model_path", str),
    (("--disaggregation-mode",), "disaggregation_mode", str),
    (("--disaggregation-transfer-backend",), "disaggregation_transfer_backend", str),
    (("--disaggregation-decode-enable-offload-kvcache",),
     "disaggregation_decode_enable_offload_kvcache", bool),
    (("--disaggregation-decode-host-receive-threshold",),
     "disaggregation_decode_host_receive_threshold", float),
    (("--disaggregation-decode-retraction-backup",), "disaggregation_decode_retraction_backup", str),
)
