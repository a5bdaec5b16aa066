"""Helix state in SGLang's /server_info (internal_states[i]["helix"] and ["helix_pd"])."""

from __future__ import annotations

from typing import Any, Optional

from .hooks import HookSpec
from .memory.hooks import helix_kv_state
from .pd import SERVER_INFO_KEY as PD_KEY, pd_transfer_state

INTERNAL_STATE_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                         "SchedulerInternalStateController._add_memory_usage")
SERVER_INFO_KEY = "helix"
SPEC_KEY = "spec"


def speculative_counts(scheduler: Any) -> Optional[dict]:
    """Speculative verify counters of `scheduler`, current to the last decode batch (None when
    speculative decoding is off).

    SGLang's own `avg_spec_accept_length` (same internal state) folds its per-interval counters
    into the lifetime totals only when it logs a decode batch (every `--decode-log-interval`
    batches, 40 by default), so it is absent before the first log and lags after it. Here the
    open interval is added, so a client can diff two readings around one run:

    - verify_steps: request-steps verified (each decode batch adds its batch size);
    - accept_tokens: tokens those steps committed (accepted drafts + the bonus token each);
    - avg_accept_length: accept_tokens / verify_steps (None before the first verify step).
    """
    algo = getattr(scheduler, "spec_algorithm", None)
    reporter = getattr(scheduler, "metrics_reporter", None)
    if algo is None or algo.is_none() or reporter is None:
        return None
    steps = int(reporter.spec_total_num_forward_ct + reporter.spec_num_forward_ct)
    tokens = int(reporter.spec_total_num_accept_tokens + reporter.spec_num_accept_tokens)
    return {"verify_steps": steps, "accept_tokens": tokens,
            "avg_accept_length": tokens / steps if steps > 0 else None}


def _after_add_memory_usage(result: Any, controller: Any, state: dict, *args: Any, **kwargs: Any) -> None:
    """Adds state["helix"] (layout + per-KVP-rank KV usage, and the speculative counters when
    speculative decoding is on) and, behind PD, state["helix_pd"]."""
    scheduler = getattr(controller, "scheduler", None)
    kv = helix_kv_state(getattr(scheduler, "token_to_kv_pool_allocator", None))
    if kv is not None:
        spec = speculative_counts(scheduler)
        if spec is not None:
            kv[SPEC_KEY] = spec
        state[SERVER_INFO_KEY] = kv
    transfers = pd_transfer_state()
    if transfers is not None:
        state[PD_KEY] = transfers
    return None


INFO_HOOKS = (HookSpec(INTERNAL_STATE_TARGET, "AFTER", _after_add_memory_usage),)
