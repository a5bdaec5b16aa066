"""The Helix command-line flags as data (`HELIX_FLAGS`) and as parsed (`HelixServerArgs`).

argparse is touched only by rules.argv (the edge that reads a command line); `HelixFlag.add_to`
receives the argument group it fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (COMM_BACKENDS, DEFAULT_EXCHANGE_DTYPE, DEFAULT_MLA_EXCHANGE, EXCHANGE_DTYPES,
                      MLA_EXCHANGES)
from .refusal import refuse

GROUP_TITLE = "Helix"
GROUP_DESCRIPTION = (
    "Helix parallelism for decode (sglang-helix plugin): the KV cache is sharded by page across "
    "KVP ranks, heads across TPA ranks; KVP x TPA must equal --tp-size."
)
# sglang.Engine users request Helix with the CLI's flags in this variable
ENV_VAR = "SGLANG_HELIX"


@dataclass(frozen=True)
class HelixFlag:
    """One CLI flag: `dest` is the argparse destination and the HelixServerArgs field."""

    flag: str
    dest: str
    help: str
    default: Any = None
    type: Any = None
    choices: tuple[str, ...] | None = None
    store_true: bool = False

    def add_to(self, group: Any) -> None:
        """Add this flag to an argparse argument group."""
        if self.store_true:
            group.add_argument(self.flag, dest=self.dest, action="store_true", help=self.help)
            return
        group.add_argument(self.flag, dest=self.dest, type=self.type, default=self.default,
                           choices=self.choices, help=self.help)


HELIX_FLAGS: tuple[HelixFlag, ...] = (
    HelixFlag(
        "--enable-helix", "enable_helix", "Enable Helix decode parallelism.", False,
        store_true=True,
    ),
    HelixFlag(
        "--helix-kvp-size", "helix_kvp_size",
        "KV-parallel ranks: the KV cache is split this many ways by page. "
        "Default: tp-size / helix-tpa-size.", None, int,
    ),
    HelixFlag(
        "--helix-tpa-size", "helix_tpa_size",
        "Attention tensor-parallel ranks (KV heads split this many ways). "
        "Default: 1 for MLA, the largest valid value for GQA.", None, int,
    ),
    HelixFlag(
        "--helix-comm-backend", "helix_comm_backend",
        "Exchange of partial outputs + LSE: a2a (one all-to-all), ag_rs (all-gather + "
        "reduce-scatter baseline), nvshmem (CUDA only).", "a2a", str, COMM_BACKENDS,
    ),
    HelixFlag(
        "--helix-hopb-slices", "helix_hopb_slices",
        "HOP-B: split the decode batch into this many slices to overlap the exchange "
        "with attention (1 = off).", 1, int,
    ),
    HelixFlag(
        "--helix-mla-exchange", "helix_mla_exchange",
        "MLA models only: what the decode exchange moves per head. latent: the kv_lora_rank-wide "
        "partial, W_UV after the merge on the rank's H/N heads. value: W_UV replicated for all "
        "heads (like W_UK) and applied to each rank's partial first, so v_head_dim-wide values "
        f"travel (~4x fewer bytes for DeepSeek-V3). Default: {DEFAULT_MLA_EXCHANGE}.",
        None, str, MLA_EXCHANGES,
    ),
    HelixFlag(
        "--helix-exchange-dtype", "helix_exchange_dtype",
        "Dtype of the partial outputs the exchange moves. fp32: as the kernels accumulate them, "
        "rounded to the model dtype once after the merge (closest to Helix off). activation: the "
        "model dtype (bf16: half the partial bytes, one more rounding per partial). The LSE is "
        f"fp32 either way. Default: {DEFAULT_EXCHANGE_DTYPE}.",
        DEFAULT_EXCHANGE_DTYPE, str, EXCHANGE_DTYPES,
    ),
)


@dataclass(frozen=True)
class HelixServerArgs:
    """The Helix flags as parsed (not yet checked against the model or the server layout)."""

    enable_helix: bool = False
    helix_kvp_size: int | None = None
    helix_tpa_size: int | None = None
    helix_comm_backend: str = "a2a"
    helix_hopb_slices: int = 1
    helix_mla_exchange: str | None = None
    helix_exchange_dtype: str = DEFAULT_EXCHANGE_DTYPE

    def __post_init__(self) -> None:
        for flag, value in (("--helix-kvp-size", self.helix_kvp_size),
                            ("--helix-tpa-size", self.helix_tpa_size)):
            if value is not None and value < 1:
                refuse(f"{flag} {value}: must be >= 1 (or leave it out to use the default)")
        if self.helix_hopb_slices < 1:
            refuse(f"--helix-hopb-slices {self.helix_hopb_slices}: must be >= 1 (1 = HOP-B off)")
        for flag, value, choices in (("--helix-comm-backend", self.helix_comm_backend, COMM_BACKENDS),
                                     ("--helix-mla-exchange", self.helix_mla_exchange, MLA_EXCHANGES),
                                     ("--helix-exchange-dtype", self.helix_exchange_dtype,
                                      EXCHANGE_DTYPES)):
            if value is not None and value not in choices:
                refuse(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if not self.enable_helix and self.explicit_flags():
            refuse(f"{', '.join(self.explicit_flags())} given without --enable-helix: "
                   "add --enable-helix, or drop the Helix flags")

    def explicit_flags(self) -> list[str]:
        """Flags whose value differs from the default (to catch Helix flags without Helix)."""
        defaults = HelixServerArgs.__dataclass_fields__
        return [flag.flag for flag in HELIX_FLAGS
                if flag.dest != "enable_helix" and getattr(self, flag.dest) != defaults[flag.dest].default]
