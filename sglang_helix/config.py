"""HelixConfig: the validated description of one Helix attention layout.

Rank convention (documented in docs/math.md): the N = KVP x TPA attention ranks are numbered
g = tpa_rank * KVP + kvp_rank. After the exchange rank g owns query-head slice g of H/N heads,
which is exactly the slice a row-parallel o_proj with TP = N expects on rank g.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import HelixError

COMM_BACKENDS = ("a2a", "ag_rs", "nvshmem")
# What an MLA decode exchanges (docs/math.md section 4): the R-wide latent partial of each head
# (W_UV after the merge, on the H/N owned heads) or the Dv-wide value (W_UV of all H heads
# applied to each rank's partial before the exchange; W_UV replicated like W_UK).
MLA_EXCHANGES = ("latent", "value")
DEFAULT_MLA_EXCHANGE = "latent"
# Dtype the exchanged partial outputs travel in (docs/math.md section 4): "fp32", as the kernels
# accumulate them, rounded to the activation dtype once after the merge (Helix off rounds its
# output once too), or "activation" (the model's dtype: half the bytes of a bf16 model's fp32
# partials, one more rounding per partial). The LSE is fp32 either way.
EXCHANGE_DTYPES = ("fp32", "activation")
DEFAULT_EXCHANGE_DTYPE = "fp32"


class HelixConfigError(HelixError, ValueError):
    """A Helix configuration that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class HelixConfig:
    """One Helix layout for one attention module.

    kvp: KV-parallel ranks (the sequence is split KVP ways, by page).
    tpa: tensor-parallel ranks for attention (KV heads split TPA ways).
    num_heads: total query heads H of the model.
    num_kv_heads: total KV heads K (1 for MLA: one latent head).
    mla: True for DeepSeek-style multi-head latent attention.
    page_size: KV page size P in tokens; ownership rotates every P tokens.
    comm_backend: "a2a" (one all_to_all_single), "ag_rs" (all-gather + reduce-scatter
        baseline) or "nvshmem" (CUDA symmetric memory).
    hopb_slices: batch slices for HOP-B overlap (1 = off).
    mla_exchange: MLA only: "latent" (exchange the R-wide latent partials, W_UV after the merge)
        or "value" (W_UV of all H heads on each rank's partial, exchange Dv-wide values).
        GQA has no W_UV: it must stay "latent" (the field's neutral value).
    exchange_dtype: "fp32" or "activation": the dtype of the exchanged partials (EXCHANGE_DTYPES).
    """

    kvp: int = 1
    tpa: int = 1
    num_heads: int = 1
    num_kv_heads: int = 1
    mla: bool = False
    page_size: int = 1
    comm_backend: str = "a2a"
    hopb_slices: int = 1
    mla_exchange: str = DEFAULT_MLA_EXCHANGE
    exchange_dtype: str = DEFAULT_EXCHANGE_DTYPE

    def __post_init__(self) -> None:
        for name in ("kvp", "tpa", "num_heads", "num_kv_heads", "page_size", "hopb_slices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                _fail(f"{name} must be >= 1, got {value}")
        if self.comm_backend not in COMM_BACKENDS:
            _fail(
                f"comm_backend={self.comm_backend!r} is unknown; "
                f"choose one of {', '.join(COMM_BACKENDS)} (--helix-comm-backend)"
            )
        if self.mla_exchange not in MLA_EXCHANGES:
            _fail(
                f"mla_exchange={self.mla_exchange!r} is unknown; choose one of "
                f"{', '.join(MLA_EXCHANGES)} (--helix-mla-exchange)"
            )
        if self.exchange_dtype not in EXCHANGE_DTYPES:
            _fail(
                f"exchange_dtype={self.exchange_dtype!r} is unknown; choose one of "
                f"{', '.join(EXCHANGE_DTYPES)} (--helix-exchange-dtype)"
            )
        if not self.mla and self.mla_exchange != "latent":
            _fail(
                f"mla_exchange={self.mla_exchange!r} with a GQA layout: the value exchange moves "
                f"MLA's W_UV before the exchange and GQA has none; drop --helix-mla-exchange"
            )
        if self.mla:
            if self.tpa != 1:
                _fail(
                    f"tpa={self.tpa} with MLA: MLA has a single latent KV head, so TPA must be 1; "
                    f"set --helix-tpa-size 1 and --helix-kvp-size {self.kvp * self.tpa}"
                )
            if self.num_kv_heads != 1:
                _fail(f"num_kv_heads={self.num_kv_heads} with MLA: the latent cache has 1 KV head")
        if self.tpa > self.num_kv_heads:
            _fail(
                f"tpa={self.tpa} > num_kv_heads={self.num_kv_heads}: a TPA group must own at least "
                f"one KV head; use --helix-tpa-size <= {self.num_kv_heads} and raise --helix-kvp-size"
            )
        if self.num_kv_heads % self.tpa:
            _fail(
                f"num_kv_heads={self.num_kv_heads} is not divisible by tpa={self.tpa}; "
                f"pick a --helix-tpa-size that divides {self.num_kv_heads}"
            )
        if self.num_heads % self.tpa:
            _fail(
                f"num_heads={self.num_heads} is not divisible by tpa={self.tpa}; "
                f"pick a --helix-tpa-size that divides {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            _fail(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_heads % self.world_size:
            _fail(
                f"num_heads={self.num_heads} is not divisible by KVP x TPA = {self.world_size}: after "
                f"the exchange each of the N ranks owns H/N query heads; choose KVP x TPA dividing H"
            )

    @property
    def world_size(self) -> int:
        """N = KVP x TPA: attention ranks, reused as TP (x EP) ranks by the FFN."""
        return self.kvp * self.tpa

    @property
    def heads_per_tpa(self) -> int:
        """Query heads each TPA group computes partial attention for (H / TPA)."""
        return self.num_heads // self.tpa

    @property
    def kv_heads_per_tpa(self) -> int:
        """KV heads each TPA group holds (K / TPA)."""
        return self.num_kv_heads // self.tpa

    @property
    def heads_per_rank(self) -> int:
        """Query heads a rank owns after the exchange (H / N)."""
        return self.num_heads // self.world_size

    def kvp_rank(self, rank: int) -> int:
        """KVP rank (sequence shard) of global attention rank g."""
        self._check_rank(rank)
        return rank % self.kvp

    def tpa_rank(self, rank: int) -> int:
        """TPA rank (head group) of global attention rank g."""
        self._check_rank(rank)
        return rank // self.kvp

    def kvp_group_ranks(self, tpa_rank: int) -> list[int]:
        """Global ranks that exchange partials with each other (same TPA group)."""
        if not 0 <= tpa_rank < self.tpa:
            raise HelixConfigError(f"tpa_rank={tpa_rank} outside [0, {self.tpa})")
        return [tpa_rank * self.kvp + k for k in range(self.kvp)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise HelixConfigError(f"rank={rank} outside [0, KVP x TPA = {self.world_size})")


def describe(config: HelixConfig) -> str:
    """One-line layout summary for logs and error messages."""
    kind = "MLA" if config.mla else "GQA"
    return (
        f"{kind} KVP={config.kvp} x TPA={config.tpa} (N={config.world_size}), "
        f"H={config.num_heads}, K={config.num_kv_heads}, page_size={config.page_size}, "
        f"comm={config.comm_backend}, hopb_slices={config.hopb_slices}, "
        f"exchange_dtype={config.exchange_dtype}"
        + (f", mla_exchange={config.mla_exchange}" if config.mla else "")
    )


def _fail(message: str) -> None:
    raise HelixConfigError(f"HelixConfig: {message}")
