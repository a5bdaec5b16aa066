"""serving_compare's per-rank KV budget: each layout's rows in the same bytes (sglang_helix.kv_size),
the check that every (L, C) fits before a server starts, and the live pool read from /server_info."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serving_configs import TP, ServerConfig, ServingCompareError

from sglang_helix.kv_size import KVShape, itemsize, max_pages_per_rank, max_requests


def layout_bytes_per_token(model_config: Mapping[str, Any], dtype: str, kvp: int = 1) -> int:
    """Bytes of one KV row (one token, all layers) on a rank that holds it, in the layout of `kvp`
    (1 = plain TP over TP ranks: GQA heads split TP ways; > 1 = Helix KVP x TPA 1: all KV heads).
    MLA: the latent, the same in any layout."""
    if kvp < 1:
        raise ValueError(f"kvp must be >= 1, got {kvp}")
    shape = KVShape.from_hf_config(model_config)
    return shape.bytes_per_token(itemsize(dtype), ranks=TP if kvp == 1 else 1)


def budget_rows(budget_tokens: int, model_config: Mapping[str, Any], dtype: str, kvp: int) -> int:
    """KV rows per rank the layout of `kvp` holds in the per-rank bytes of `budget_tokens` plain-TP
    rows (MLA: the same rows; GQA with TP <= K under Helix TPA 1: rows x ceil(K/TP) / K)."""
    plain = layout_bytes_per_token(model_config, dtype, 1)
    return budget_tokens * plain // layout_bytes_per_token(model_config, dtype, kvp)


def check_budget(budget_tokens: int, page_size: int, context_lens: Sequence[int],
                 output_len: int, concurrency: Sequence[int], kvp_values: Sequence[int],
                 rows_per_rank: Mapping[int, int] | None = None) -> None:
    """Before any server starts: every (L, C) must fit the per-rank budget on every layout
    (`rows_per_rank[kvp]`: that layout's rows in the budget, default `budget_tokens`)."""
    if budget_tokens % page_size:
        raise ServingCompareError(
            f"--kv-budget-tokens {budget_tokens} must be a multiple of --page-size {page_size}")
    for kvp in sorted(set(kvp_values)):
        rows = (rows_per_rank or {}).get(kvp, budget_tokens)
        for length in context_lens:
            fit = max_requests(rows // page_size, length + output_len, page_size, kvp)
            if fit < max(concurrency):
                need = max(concurrency) * max_pages_per_rank(length + output_len, page_size, kvp)
                raise ServingCompareError(
                    f"{'plain TP' if kvp == 1 else f'Helix KVP {kvp}'}: {max(concurrency)} "
                    f"concurrent requests of {length}+{output_len} tokens need {need * page_size} "
                    f"KV rows per rank, the budget holds {rows} (fits {fit}); raise "
                    f"--kv-budget-tokens to >= {-(-need * page_size * budget_tokens // rows)} "
                    f"or lower --concurrency")


@dataclass(frozen=True)
class PoolInfo:
    """Per-rank KV pool of a live server (from GET /server_info)."""

    pages_per_rank: int
    page_size: int
    kvp: int

    @property
    def rows_per_rank(self) -> int:
        return self.pages_per_rank * self.page_size


def pool_info(server_info: Mapping[str, Any], config: ServerConfig, page_size: int) -> PoolInfo:
    """Per-rank pool of `config`'s server; errors if the server's layout is not the one asked."""
    states = server_info.get("internal_states") or [{}]
    helix = states[0].get("helix")
    if not config.helix:
        if helix is not None:
            raise ServingCompareError(f"{config.name}: Helix state present on a plain TP server")
        rows = int(server_info["max_total_num_tokens"])
        return PoolInfo(rows // page_size, page_size, 1)
    if helix is None:
        raise ServingCompareError(
            f"{config.name}: /server_info has no internal_states[0]['helix'] (Helix not active)")
    lay = helix["layout"]
    asked = {"kvp": config.kvp, "tpa": 1, "comm_backend": config.comm,
             "hopb_slices": config.hopb_slices, "page_size": page_size}
    got = {k: lay[k] for k in asked}
    if got != asked:
        raise ServingCompareError(f"{config.name}: server layout {got} != asked {asked}")
    per_rank = [int(r["total_pages"]) for r in helix["per_kvp_rank"]]
    return PoolInfo(min(per_rank), int(helix["page_size"]), int(lay["kvp"]))


def check_pool_matches_budget(pool: PoolInfo, budget_tokens: int, name: str) -> None:
    """The live per-rank pool must be the budget (`budget_tokens`: rows of this layout, see
    `budget_rows`) to within one page."""
    if abs(pool.rows_per_rank - budget_tokens) > pool.page_size:
        raise ServingCompareError(
            f"{name}: per-rank KV pool holds {pool.rows_per_rank} rows, the budget is "
            f"{budget_tokens}; SGLang sized the pool differently (memory profile?) - raise "
            f"--mem-fraction-static or lower --kv-budget-tokens")
