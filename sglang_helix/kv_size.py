"""KV cache sizes: bytes of a token's KV row on one rank, request pages per KVP rank, pool bytes.

The one home of this arithmetic: the simulator (`perf/`), the benchmarks, the GPU check and the
server's `/server_info` all use it. Pure integers: no SGLang, and torch only inside `itemsize`
(the planner's command line runs without importing torch).

A token's KV row on one attention rank, per layer (`KVShape.elems_per_token(ranks)`):

- MLA: kv_lora_rank + qk_rope_dim elements, one latent head, replicated on every attention rank
  (plain TP and Helix TPA alike), so `ranks` does not change it;
- GQA: ceil(K / N) x (head_dim + v_head_dim), K the model's KV heads, N the ranks they are split
  over (plain TP: the attention TP size; Helix: TPA). N | K: K / N heads; N > K: one replicated
  head (SGLang keeps max(1, K // N) on GPU, its CPU engine pads K up to a multiple of N: both are
  ceil(K / N) wherever SGLang accepts the layout).

Bytes = elements x itemsize x layers. Pages: logical page j of a request lives on KVP rank
j % KVP, so rank 0 holds the most of one request's pages, ceil(pages / KVP). SGLang allocates one
padding page beyond the rows a pool serves (`pool_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import HelixError

if TYPE_CHECKING:
    import torch


class KVSizeError(HelixError, ValueError):
    """A KV shape or size argument out of range (the message names it)."""


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name ("bfloat16", "float8_e4m3fn", ...)."""
    import torch

    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise KVSizeError(f"unknown KV dtype {dtype!r}; use a torch dtype name such as "
                              f"'bfloat16', 'float32' or 'float8_e4m3fn'")
        dtype = found
    return dtype.itemsize


def _check_positive(**values: int) -> None:
    _check_ints(1, values)


def _check_count(**values: int) -> None:
    _check_ints(0, values)


def _check_ints(least: int, values: dict[str, int]) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise KVSizeError(f"{name} must be an int >= {least}, got {value!r}")


@dataclass(frozen=True)
class KVShape:
    """What one token caches per layer for the whole model, and in how many layers.

    MLA (kv_lora_rank > 0): one latent head of kv_lora_rank + qk_rope_dim elements; num_kv_heads,
    head_dim and v_head_dim stay 0. GQA: num_kv_heads heads of head_dim (K) + v_head_dim (V).
    """

    layers: int
    num_kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0

    def __post_init__(self) -> None:
        _check_positive(layers=self.layers)
        if self.mla:
            if self.qk_rope_dim < 0 or (self.num_kv_heads, self.head_dim, self.v_head_dim) != (0, 0, 0):
                raise KVSizeError(
                    f"MLA KVShape takes kv_lora_rank and qk_rope_dim >= 0 only, got {self}")
        else:
            _check_positive(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            v_head_dim=self.v_head_dim)
            if self.qk_rope_dim:
                raise KVSizeError(f"qk_rope_dim is an MLA field (set kv_lora_rank too), got {self}")

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @classmethod
    def mla_latent(cls, kv_lora_rank: int, qk_rope_dim: int, layers: int = 1) -> KVShape:
        return cls(layers, kv_lora_rank=kv_lora_rank, qk_rope_dim=qk_rope_dim)

    @classmethod
    def gqa(cls, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
            layers: int = 1) -> KVShape:
        """GQA heads; v_head_dim defaults to head_dim."""
        return cls(layers, num_kv_heads, head_dim, head_dim if v_head_dim is None else v_head_dim)

    @classmethod
    def of(cls, dims: Any, *, mla: bool, layers: int, num_kv_heads: int = 1) -> KVShape:
        """From an object carrying SGLang's dimension names (its ModelConfig, its KV pools):
        `kv_lora_rank` + `qk_rope_head_dim` for MLA, `head_dim` + `v_head_dim` for GQA
        (num_kv_heads: GQA only)."""
        if mla:
            return cls.mla_latent(int(dims.kv_lora_rank), int(dims.qk_rope_head_dim), layers)
        return cls.gqa(num_kv_heads, int(dims.head_dim), int(dims.v_head_dim), layers)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> KVShape:
        """From a Hugging Face config.json: MLA when it has `kv_lora_rank`; a GQA head_dim absent
        from the config is hidden_size / num_attention_heads, its v_head_dim = head_dim."""
        layers = int(config["num_hidden_layers"])
        if config.get("kv_lora_rank"):
            return cls.mla_latent(int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"]), layers)
        head_dim = int(config.get("head_dim")
                       or int(config["hidden_size"]) // int(config["num_attention_heads"]))
        return cls.gqa(int(config["num_key_value_heads"]), head_dim, int(config.get("v_head_dim") or head_dim),
                       layers)

    def heads_per_rank(self, ranks: int = 1) -> int:
        """KV heads one rank holds when the heads are split over `ranks` (MLA: the one latent)."""
        _check_positive(ranks=ranks)
        return 1 if self.mla else -(-self.num_kv_heads // ranks)

    def elems_per_token(self, ranks: int = 1) -> int:
        """Cached elements of one token in one layer on one of `ranks` head-split ranks."""
        if self.mla:
            _check_positive(ranks=ranks)
            return self.kv_lora_rank + self.qk_rope_dim
        return self.heads_per_rank(ranks) * (self.head_dim + self.v_head_dim)

    def bytes_per_token(self, item_bytes: int, ranks: int = 1) -> int:
        """KV bytes of one token over all layers on one of `ranks` head-split ranks
        (item_bytes: `itemsize` of the KV dtype)."""
        _check_positive(item_bytes=item_bytes)
        return self.elems_per_token(ranks) * item_bytes * self.layers


# ----------------------------------------------------------------------------- pages and pools


def max_pages_per_rank(tokens: int, page_size: int, kvp: int = 1) -> int:
    """Pages of one `tokens`-token request on the KVP rank holding the most of them (rank 0:
    ceil(pages / KVP)); kvp 1 = every page (plain TP holds all of them on every rank)."""
    _check_positive(page_size=page_size, kvp=kvp)
    _check_count(tokens=tokens)
    pages = -(-tokens // page_size)  # sharding.num_pages, without importing torch
    return -(-pages // kvp)


def request_bytes_per_rank(tokens: int, page_size: int, kvp: int, bytes_per_token: int) -> int:
    """Per-rank KV bytes one request occupies: whole pages on its busiest KVP rank."""
    return max_pages_per_rank(tokens, page_size, kvp) * page_size * bytes_per_token


def max_requests(pool_pages_per_rank: int, tokens: int, page_size: int, kvp: int = 1) -> int:
    """Concurrent `tokens`-token requests whose pages fit a pool of `pool_pages_per_rank` pages on
    every rank (each request's pages dealt round-robin from KVP rank 0)."""
    _check_count(pool_pages_per_rank=pool_pages_per_rank)
    need = max_pages_per_rank(tokens, page_size, kvp)
    if need == 0:
        raise KVSizeError("a 0-token request takes no page: the count of requests is unbounded")
    return pool_pages_per_rank // need


def pool_bytes(rows: int, page_size: int, bytes_per_token: int) -> int:
    """Bytes of a KV pool serving `rows` token rows: SGLang allocates one padding page more."""
    _check_count(rows=rows)
    _check_positive(page_size=page_size)
    return (rows + page_size) * bytes_per_token
