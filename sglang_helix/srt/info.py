"""Helix state in SGLang's /server_info (internal_states[i]["helix"] and ["helix_pd"])."""

from __future__ import annotations

from typing import Any

from .hooks import HookSpec
from .memory.hooks import helix_kv_state
from .pd import SERVER_INFO_KEY as PD_KEY, pd_transfer_state

INTERNAL_STATE_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                         "SchedulerInternalStateController._add_memory_usage")
SERVER_INFO_KEY = "helix"


def _after_add_memory_usage(result: Any, controller: Any, state: dict, *args: Any, **kwargs: Any) -> None:
    """Adds state["helix"] (layout + per-KVP-rank KV usage) and, behind PD, state["helix_pd"]."""
    allocator = getattr(getattr(controller, "scheduler", None), "token_to_kv_pool_allocator", None)
    kv = helix_kv_state(allocator)
    if kv is not None:
        state[SERVER_INFO_KEY] = kv
    transfers = pd_transfer_state()
    if transfers is not None:
        state[PD_KEY] = transfers
    return None


INFO_HOOKS = (HookSpec(INTERNAL_STATE_TARGET, "AFTER", _after_add_memory_usage),)
