"""The one per-process Helix runtime of an SGLang process: set once, read everywhere in srt/.

Two facts live here and nowhere else:
- the HelixConfig of this server, stored by the plugin's late validation on the ServerArgs as
  `CONFIG_ATTR` (ServerArgs pickles its __dict__, so scheduler ranks see it); `current_config()`
  reads it from SGLang's published ServerArgs (None: Helix off in this process);
- the `HelixRuntime` (config, global attention rank, this rank's KVP group), created by the AFTER
  hook on `initialize_model_parallel` (srt.hook_table) right after SGLang built its TP groups, on
  every rank in the same order (creating the KVP groups is collective). `runtime()` returns it.

Helix shards attention inside each of SGLang's attention-TP groups: N = KVP x TPA = the attention
TP size (--tp-size, or --tp-size / D under DP attention of D groups), the Helix rank g = SGLang's
attention-TP rank. SGLang numbers those groups as blocks of N consecutive global ranks (pipeline
stage by stage, DP-attention group by group), so every block is its own Helix group with its own
KVP groups, while the FFN keeps SGLang's TP (x EP) over all ranks of a stage. DP replicas
(--dp-size without DP attention) are separate torch.distributed worlds: one Helix group each.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..comm import create_kvp_groups
from ..config import HelixConfig
from ..errors import HelixError
from .hooks import wraps_hook

logger = logging.getLogger(__name__)

CONFIG_ATTR = "_helix_config"  # the resolved HelixConfig on ServerArgs
ARGS_ATTR = "_helix_args"  # the parsed Helix flags (HelixServerArgs) on ServerArgs


class HelixRuntimeError(HelixError):
    """The Helix runtime cannot be set up as asked; the message names the fix."""


@dataclass
class HelixRuntime:
    """Per-process Helix state: config, attention rank g, this rank's KVP group, and which of the
    world's `attention_groups` attention-TP groups (blocks of N ranks) this rank is in."""

    config: HelixConfig
    rank: int
    kvp_group: Any
    attention_group: int = 0
    attention_groups: int = 1
    mixed_batches: int = 0  # extend batches with decode rows (--enable-mixed-chunk) planned here


_RUNTIME: Optional[HelixRuntime] = None


def runtime() -> Optional[HelixRuntime]:
    """This process's HelixRuntime (None: Helix off, or groups not created yet)."""
    return _RUNTIME


def config_of(server_args: Any) -> Optional[HelixConfig]:
    """The HelixConfig a ServerArgs (or a stand-in with that attribute) carries, or None."""
    return getattr(server_args, CONFIG_ATTR, None)


def current_config() -> Optional[HelixConfig]:
    """The HelixConfig on the published ServerArgs of this process (None: Helix off)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        server_args = get_server_args()
    except Exception:  # context not published (tools, unit tests): Helix is off here
        return None
    return config_of(server_args)


def init_runtime(cfg: HelixConfig, rank: int, group_factory=None, *, attention_groups: int = 1,
                 attention_group: int = 0) -> HelixRuntime:
    """Create the KVP groups of every attention group (collective on all ranks of the world) and
    store the runtime; once only."""
    global _RUNTIME
    if _RUNTIME is not None:
        raise HelixRuntimeError("Helix KVP groups were already created in this process")
    group = create_kvp_groups(cfg, rank, group_factory, attention_groups=attention_groups,
                              attention_group=attention_group)
    _RUNTIME = HelixRuntime(cfg, rank, group, attention_group, attention_groups)
    logger.info("sglang_helix: KVP groups ready on rank %d (KVP rank %d, TPA rank %d) of attention "
                "group %d/%d", rank, cfg.kvp_rank(rank), cfg.tpa_rank(rank), attention_group,
                attention_groups)
    return _RUNTIME


def attn_rank() -> int:
    """SGLang's attention-TP rank of this process (= the Helix rank g under Helix)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_rank


def _after_initialize_model_parallel(result: Any, *args: Any, **kwargs: Any) -> None:
    cfg = current_config()
    if cfg is None or _RUNTIME is not None:
        return None
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    groups, group = attention_group_of(par.attn_tp_size, par.attn_tp_rank, dist.get_world_size(),
                                       dist.get_rank(), cfg.world_size)
    init_runtime(cfg, par.attn_tp_rank, attention_groups=groups, attention_group=group)
    return None


def attention_group_of(attn_tp_size: int, attn_tp_rank: int, world_size: int, global_rank: int,
                       helix_ranks: int) -> tuple[int, int]:
    """(attention groups in the world, this rank's): SGLang's attention-TP groups are blocks of
    attn_tp_size consecutive global ranks, each one Helix group of KVP x TPA = helix_ranks."""
    if attn_tp_size != helix_ranks:
        raise HelixRuntimeError(f"attention TP size {attn_tp_size} (--tp-size / DP-attention size) "
                                f"!= Helix KVP x TPA = {helix_ranks}; set --tp-size so that each "
                                f"attention TP group has {helix_ranks} ranks")
    if world_size % attn_tp_size or global_rank % attn_tp_size != attn_tp_rank:
        raise HelixRuntimeError(f"global rank {global_rank} of {world_size} is attention-TP rank "
                                f"{attn_tp_rank} of {attn_tp_size}: not SGLang's layout of "
                                "consecutive attention-TP groups Helix shards")
    return world_size // attn_tp_size, global_rank // attn_tp_size


def bootstrap_binding_live() -> bool:
    """SGLang's bootstrap binds `initialize_model_parallel` by name (`from ... import`); HookRegistry
    rewrites that binding too. True once it wraps the state hook (or bootstrap is not imported)."""
    bootstrap = sys.modules.get("sglang.srt.distributed.bootstrap")
    return bootstrap is None or wraps_hook(getattr(bootstrap, "initialize_model_parallel", None),
                                           _after_initialize_model_parallel)
