"""The one per-process Helix runtime of an SGLang process: set once, read everywhere in srt/.

Two facts live here and nowhere else:
- the HelixConfig of this server, stored by the plugin's late validation on the ServerArgs as
  `CONFIG_ATTR` (ServerArgs pickles its __dict__, so scheduler ranks see it); `current_config()`
  reads it from SGLang's published ServerArgs (None: Helix off in this process);
- the `HelixRuntime` (config, global attention rank, this rank's KVP group), created by the AFTER
  hook on `initialize_model_parallel` (srt.hook_table) right after SGLang built its TP groups, on
  every rank in the same order (creating the KVP groups is collective). `runtime()` returns it.
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
    """Per-process Helix state: config, global attention rank g, this rank's KVP group."""

    config: HelixConfig
    rank: int
    kvp_group: Any


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


def init_runtime(cfg: HelixConfig, rank: int, group_factory=None) -> HelixRuntime:
    """Create the KVP groups (collective on all N ranks) and store the runtime; once only."""
    global _RUNTIME
    if _RUNTIME is not None:
        raise HelixRuntimeError("Helix KVP groups were already created in this process")
    group = create_kvp_groups(cfg, rank, group_factory)
    _RUNTIME = HelixRuntime(cfg, rank, group)
    logger.info("sglang_helix: KVP groups ready on rank %d (KVP rank %d, TPA rank %d)",
                rank, cfg.kvp_rank(rank), cfg.tpa_rank(rank))
    return _RUNTIME


def attn_rank() -> int:
    """SGLang's attention-TP rank of this process (= the Helix rank g under Helix)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_rank


def _after_initialize_model_parallel(result: Any, *args: Any, **kwargs: Any) -> None:
    cfg = current_config()
    if cfg is None or _RUNTIME is not None:
        return None
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.tp_size != cfg.world_size or par.pp_size != 1:
        raise HelixRuntimeError(f"--tp-size {par.tp_size} (pp {par.pp_size}) does not match Helix "
                                f"KVP x TPA = {cfg.world_size}; set --tp-size {cfg.world_size}")
    init_runtime(cfg, par.tp_rank)
    return None


def bootstrap_binding_live() -> bool:
    """SGLang's bootstrap binds `initialize_model_parallel` by name (`from ... import`); HookRegistry
    rewrites that binding too. True once it wraps the state hook (or bootstrap is not imported)."""
    bootstrap = sys.modules.get("sglang.srt.distributed.bootstrap")
    return bootstrap is None or wraps_hook(getattr(bootstrap, "initialize_model_parallel", None),
                                           _after_initialize_model_parallel)
