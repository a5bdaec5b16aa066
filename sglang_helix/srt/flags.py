"""The Helix command-line flags as data (srt.args turns them into argparse and a HelixConfig)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..config import (COMM_BACKENDS, DEFAULT_EXCHANGE_DTYPE, DEFAULT_MLA_EXCHANGE, EXCHANGE_DTYPES,
                      MLA_EXCHANGES)


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

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        if self.store_true:
            group.add_argument(self.flag, dest=self.dest, action="store_true", help=self.help)
            return
        group.add_argument(
            self.flag,
            dest=self.dest,
            type=self.type,
            default=self.default,
            choices=self.choices,
            help=self.help,
        )


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
