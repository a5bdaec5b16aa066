"""Prefill/decode disaggregation: the Helix relayout at the KV-transfer boundary (mooncake).

A plain prefill server (Helix off, any TP) feeds a Helix decode server over SGLang's mooncake
transfer backend. The decode server allocates the request's pages with the KVP-colored allocator
(logical page j gets an id with id % KVP == j % KVP), so the relayout is index math:

- decode rank (kvp r, tpa t) sends the prefill its page list as `transfer_page_slots`: the local
  slot of every page it stores, the sink slot 0 (its padding page) for the others; its
  registration says it holds the
  heads of attention-TP rank t of TPA (GQA: K/TPA heads; MLA: TPA is 1) and carries a Helix tag;
- the prefill (this plugin installed, Helix off) drops the sink pairs for Helix peers before
  mooncake writes (`owned_transfer_pairs`), so decode rank r receives exactly 1/KVP of the pages,
  and counts the bytes it wrote per peer (published as /server_info `helix_pd`).

Pages the decode server already holds in its radix cache (`--disaggregation-decode-enable-radix-
cache`) are never in the list: SGLang sends only the uncached suffix.

GQA: SGLang maps decode attention rank g to prefill rank g // (decode_tp / prefill_tp); with
g = tpa_rank * KVP + kvp_rank that is the right head shard exactly when the prefill's attention
TP divides TPA. Other prefill layouts fail the request with a message (never wrong KV).

The hooks (AROUND, SGLang's mooncake connection: registration, metadata, transfers) are rows of
srt.hook_table. The CPU engine's own PD fixes live in srt.cpu.pd_fix.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..errors import HelixError
from ..sharding import owned_transfer_pairs, transfer_page_slots
from . import state

logger = logging.getLogger(__name__)

HELIX_TAG = b"sglang_helix.pd/1 "
REGISTRATION_FIELDS = 20  # SGLang 0.5.23's registration message; the Helix tag goes after it
SERVER_INFO_KEY = "helix_pd"
# Fault injection for tests: while the file this names exists, the prefill holds each KV write
# (at most HOLD_MAX_S), so a test can kill a peer with a transfer provably in flight.
HOLD_ENV = "SGLANG_HELIX_PD_HOLD_FILE"
HOLD_MAX_S = 120.0


class HelixPDError(HelixError):
    """A prefill/decode pairing the Helix relayout cannot serve."""


@dataclass(frozen=True)
class HelixPeer:
    """What a Helix decode rank tells the prefill about itself (registration tag)."""

    kvp: int
    kvp_rank: int
    tpa: int
    tpa_rank: int
    rank: int

    def to_bytes(self) -> bytes:
        return HELIX_TAG + json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_message(cls, msg: list) -> Optional["HelixPeer"]:
        """The tag of a registration message, or None (a plain decode rank)."""
        for part in msg[REGISTRATION_FIELDS:]:
            if isinstance(part, (bytes, bytearray)) and bytes(part).startswith(HELIX_TAG):
                return cls(**json.loads(bytes(part)[len(HELIX_TAG):]))
        return None


def gqa_prefill_tp_problem(prefill_attn_tp: int, tpa: int) -> Optional[str]:
    """Why a GQA prefill with `prefill_attn_tp` attention ranks cannot feed TPA = `tpa` (or None)."""
    if prefill_attn_tp <= tpa and tpa % prefill_attn_tp == 0:
        return None
    return (f"Helix decode with --helix-tpa-size {tpa} needs KV heads sharded the same or finer "
            f"than the prefill's, but the prefill server runs attention TP {prefill_attn_tp}; "
            f"start the prefill with --tp-size dividing {tpa} (e.g. --tp-size 1)")


# ----------------------------------------------------------------------------- decode side


def decode_peer() -> Optional[HelixPeer]:
    """This decode rank's Helix identity (None: Helix off in this process)."""
    rt = state.runtime()
    if rt is None:
        return None
    cfg = rt.config
    return HelixPeer(cfg.kvp, cfg.kvp_rank(rt.rank), cfg.tpa, cfg.tpa_rank(rt.rank), rt.rank)


def _around_registration(original: Callable, mgr: Any, *args: Any, **kwargs: Any) -> list:
    msg = original(mgr, *args, **kwargs)
    peer = decode_peer()
    if peer is None:
        return msg
    if len(msg) != REGISTRATION_FIELDS:
        raise HelixPDError(f"SGLang's mooncake registration has {len(msg)} fields, expected "
                           f"{REGISTRATION_FIELDS}: sglang_helix supports sglang 0.5.23")
    msg = list(msg)
    # The prefill slices heads by (dst_tp_rank, dst_attn_tp_size): a Helix rank holds the heads
    # of TPA rank tpa_rank, whatever its KVP rank.
    msg[7] = str(peer.tpa_rank).encode("ascii")
    msg[8] = str(peer.tpa).encode("ascii")
    msg.append(peer.to_bytes())
    return msg


def _fail_room(receiver: Any, reason: str) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    logger.error("sglang_helix: request %s: %s", receiver.bootstrap_room, reason)
    receiver.kv_mgr.record_failure(receiver.bootstrap_room, reason)
    receiver.kv_mgr.update_status(receiver.bootstrap_room, KVPoll.Failed)


def _around_send_metadata(original: Callable, receiver: Any, kv_indices: Any, *args: Any,
                          **kwargs: Any) -> Any:
    peer = decode_peer()
    if peer is None:
        return original(receiver, kv_indices, *args, **kwargs)
    info = getattr(receiver, "prefill_info", None)
    if info is not None and not receiver.kv_mgr.is_mla_backend:
        problem = gqa_prefill_tp_problem(int(info.attn_tp_size), peer.tpa)
        if problem is not None:
            return _fail_room(receiver, problem)
    ids = torch.from_numpy(np.asarray(kv_indices, dtype=np.int64))
    slots = transfer_page_slots(ids, peer.kvp_rank, peer.kvp).numpy().astype(np.int32)
    return original(receiver, slots, *args, **kwargs)


# ----------------------------------------------------------------------------- prefill side


class TransferCounters:
    """Bytes and pages this prefill wrote per decode session (thread-safe; transfer workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_session: dict[str, dict[str, Any]] = {}
        self._local = threading.local()

    def _entry(self, session: str) -> dict[str, Any]:
        return self._by_session.setdefault(
            session, {"session": session, "helix": None, "kv_bytes": 0, "kv_pages": 0,
                      "other_bytes": 0})

    def start_kv(self, session: str, peer: Optional[HelixPeer], pages: int) -> None:
        with self._lock:
            entry = self._entry(session)
            entry["helix"] = asdict(peer) if peer is not None else None
            entry["kv_pages"] += pages
        self._local.kv = True

    def end_kv(self) -> None:
        self._local.kv = False

    def add_bytes(self, session: str, nbytes: int) -> None:
        key = "kv_bytes" if getattr(self._local, "kv", False) else "other_bytes"
        with self._lock:
            self._entry(session)[key] += nbytes

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._by_session.values()]


COUNTERS = TransferCounters()


def _around_from_zmq(original: Callable, cls: Any, msg: list, *args: Any, **kwargs: Any) -> Any:
    info = original(cls, msg, *args, **kwargs)
    info.helix_peer = HelixPeer.from_message(msg)
    return info


def peer_of(mgr: Any, session: str) -> Optional[HelixPeer]:
    info = getattr(mgr, "decode_kv_args_table", {}).get(session)
    return getattr(info, "helix_peer", None)


def _owned_only(peer: Optional[HelixPeer], src: Any, dst: Any):
    if peer is None:
        return src, dst
    kept_src, kept_dst = owned_transfer_pairs(torch.from_numpy(np.asarray(src, dtype=np.int64)),
                                              torch.from_numpy(np.asarray(dst, dtype=np.int64)))
    return kept_src.numpy().astype(np.asarray(src).dtype), kept_dst.numpy().astype(np.int32)


def hold_if_requested(environ=None) -> float:
    """Block while the HOLD_ENV file exists (bounded; touches `<file>.held` first); returns the
    seconds held."""
    path = (os.environ if environ is None else environ).get(HOLD_ENV)
    t0 = time.monotonic()
    if not path or not os.path.exists(path):
        return 0.0
    with open(path + ".held", "w"):  # tells the test a write is now in flight
        pass
    while os.path.exists(path) and time.monotonic() - t0 < HOLD_MAX_S:
        time.sleep(0.05)
    return time.monotonic() - t0


def _around_send(original: Callable, mgr: Any, session: str, prefill_kv_indices: Any,
                 dst_kv_ptrs: Any, dst_kv_indices: Any, *args: Any, **kwargs: Any) -> int:
    hold_if_requested()
    peer = peer_of(mgr, session)
    src, dst = _owned_only(peer, prefill_kv_indices, dst_kv_indices)
    COUNTERS.start_kv(session, peer, len(dst))
    try:
        if len(dst) == 0:
            return 0  # this decode rank owns none of the chunk's pages
        return original(mgr, session, src, dst_kv_ptrs, dst, *args, **kwargs)
    finally:
        COUNTERS.end_kv()


def _around_transfer_data(original: Callable, mgr: Any, session: str, transfer_blocks: Any,
                          *args: Any, **kwargs: Any) -> int:
    ret = original(mgr, session, transfer_blocks, *args, **kwargs)
    if ret == 0:
        COUNTERS.add_bytes(session, sum(int(length) for _, _, length in transfer_blocks))
    return ret


def pd_transfer_state() -> Optional[dict]:
    """/server_info state of this process's transfers (None before the first KV transfer)."""
    sent = COUNTERS.snapshot()
    return {"sent": sent} if sent else None
