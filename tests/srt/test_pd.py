"""The Helix PD relayout hooks (sglang_helix.srt.pd) and the PD flag rules, without servers.

The hooks are called the way SGLang's mooncake KV manager calls them (same argument order) with
small stand-in objects; the real end-to-end path is tests/e2e/test_serve_pd.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sglang_helix.srt import pd as sglang_pd
from sglang_helix.config import HelixConfigError
from sglang_helix.sharding import SINK_SLOT
from sglang_helix.srt.pd import HelixPeer


def peer(kvp=2, kvp_rank=1, tpa=1, tpa_rank=0):
    return HelixPeer(kvp=kvp, kvp_rank=kvp_rank, tpa=tpa, tpa_rank=tpa_rank,
                     rank=tpa_rank * kvp + kvp_rank)


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch):
    monkeypatch.setattr(sglang_pd, "COUNTERS", sglang_pd.TransferCounters())


# ------------------------------------------------------------------ registration tag


def test_peer_tag_round_trips_and_plain_messages_have_none():
    p = peer(kvp=4, kvp_rank=3, tpa=2, tpa_rank=1)
    msg = [b"x"] * sglang_pd.REGISTRATION_FIELDS + [p.to_bytes()]
    assert HelixPeer.from_message(msg) == p
    assert HelixPeer.from_message([b"x"] * sglang_pd.REGISTRATION_FIELDS) is None
    # a tag-like payload inside SGLang's own fields is not read as a tag
    assert HelixPeer.from_message([p.to_bytes()] * sglang_pd.REGISTRATION_FIELDS) is None


def test_registration_says_tpa_heads_and_appends_the_tag(monkeypatch):
    p = peer(kvp=2, kvp_rank=1, tpa=2, tpa_rank=1)
    monkeypatch.setattr(sglang_pd, "decode_peer", lambda: p)
    base = [str(i).encode() for i in range(sglang_pd.REGISTRATION_FIELDS)]
    msg = sglang_pd._around_registration(lambda mgr: list(base), object())
    assert msg[7] == b"1" and msg[8] == b"2"  # dst_tp_rank = tpa_rank, dst_attn_tp_size = TPA
    assert msg[:7] == base[:7] and msg[9:20] == base[9:20]
    assert HelixPeer.from_message(msg) == p


def test_registration_passes_through_without_helix_and_refuses_unknown_layouts(monkeypatch):
    base = [b"a"] * sglang_pd.REGISTRATION_FIELDS
    monkeypatch.setattr(sglang_pd, "decode_peer", lambda: None)
    assert sglang_pd._around_registration(lambda mgr: base, object()) is base
    monkeypatch.setattr(sglang_pd, "decode_peer", lambda: peer())
    with pytest.raises(sglang_pd.HelixPDError, match="0.5.23"):
        sglang_pd._around_registration(lambda mgr: base[:-1], object())


# ------------------------------------------------------------------ decode: page list


class Receiver:
    def __init__(self, mla=True, prefill_tp=1):
        self.bootstrap_room = 7
        self.prefill_info = SimpleNamespace(attn_tp_size=prefill_tp)
        self.failures = []
        self.kv_mgr = SimpleNamespace(
            is_mla_backend=mla,
            record_failure=lambda room, reason: self.failures.append((room, reason)),
            update_status=lambda room, status: self.failures.append((room, status)))


def test_decode_rank_sends_its_slots_and_marks_the_rest(monkeypatch):
    monkeypatch.setattr(sglang_pd, "decode_peer", lambda: peer(kvp=2, kvp_rank=1))
    sent = {}

    def original(receiver, kv_indices, aux_index, **kwargs):
        sent.update(indices=kv_indices, aux=aux_index, kwargs=kwargs)

    pages = np.array([10, 13, 4, 7, 8], dtype=np.int32)  # colored ids: id % 2 = owner
    sglang_pd._around_send_metadata(original, Receiver(), pages, 3, decode_prefix_len=8)
    assert sent["indices"].dtype == np.int32
    assert sent["indices"].tolist() == [SINK_SLOT, 6, SINK_SLOT, 3, SINK_SLOT]
    assert sent["aux"] == 3 and sent["kwargs"] == {"decode_prefix_len": 8}


def test_gqa_prefill_with_coarser_heads_fails_the_request_not_the_server(monkeypatch):
    monkeypatch.setattr(sglang_pd, "decode_peer", lambda: peer(kvp=2, tpa=1))
    called = []
    receiver = Receiver(mla=False, prefill_tp=2)
    sglang_pd._around_send_metadata(lambda *a, **k: called.append(a), receiver,
                                    np.array([2, 3], dtype=np.int32), 0)
    assert not called
    room, reason = receiver.failures[0]
    assert room == 7 and "--helix-tpa-size 1" in reason and "prefill with --tp-size" in reason
    # MLA: every prefill rank holds the whole latent, any prefill TP works
    ok = Receiver(mla=True, prefill_tp=2)
    sglang_pd._around_send_metadata(lambda *a, **k: called.append(a), ok,
                                    np.array([2, 3], dtype=np.int32), 0)
    assert called and not ok.failures


@pytest.mark.parametrize("prefill_tp, tpa, ok", [
    (1, 1, True), (1, 2, True), (2, 2, True), (2, 4, True), (2, 1, False), (4, 2, False),
    (3, 4, False),
])
def test_gqa_prefill_tp_rule(prefill_tp, tpa, ok):
    assert (sglang_pd.gqa_prefill_tp_problem(prefill_tp, tpa) is None) == ok


# ------------------------------------------------------------------ prefill: sends and counters


def manager(helix_peer):
    return SimpleNamespace(decode_kv_args_table={"s": SimpleNamespace(helix_peer=helix_peer)})


def test_prefill_sends_only_owned_pairs_and_counts_them():
    calls = []

    def original(mgr, session, src, ptrs, dst, executor, **kwargs):
        calls.append((src.tolist(), dst.tolist(), executor, kwargs))
        return 0

    src = np.array([100, 101, 102, 103], dtype=np.int64)
    dst = np.array([SINK_SLOT, 5, SINK_SLOT, 6], dtype=np.int32)
    ret = sglang_pd._around_send(original, manager(peer()), "s", src, [1], dst, "ex", dst_layer_ids=[0])
    assert ret == 0
    assert calls == [([101, 103], [5, 6], "ex", {"dst_layer_ids": [0]})]
    (entry,) = sglang_pd.COUNTERS.snapshot()
    assert entry["kv_pages"] == 2 and entry["helix"]["kvp_rank"] == 1


def test_prefill_skips_a_chunk_this_rank_owns_nothing_of():
    def original(*args, **kwargs):
        raise AssertionError("nothing to send")

    dst = np.array([SINK_SLOT, SINK_SLOT], dtype=np.int32)
    assert sglang_pd._around_send(original, manager(peer()), "s", np.array([1, 2]), [], dst) == 0


def test_plain_decode_peers_pass_through_unchanged():
    seen = []
    src, dst = np.array([1, 2]), np.array([3, 4], dtype=np.int32)
    sglang_pd._around_send(lambda mgr, s, a, p, b, *r: seen.append((a, b)) or 0,
                           manager(None), "s", src, [], dst)
    assert seen[0][0] is src and seen[0][1] is dst
    assert sglang_pd.COUNTERS.snapshot()[0]["helix"] is None


def test_bytes_are_counted_as_kv_only_inside_a_kv_send():
    blocks = [(0, 0, 64), (64, 64, 32)]
    mgr = manager(peer())
    xfer = sglang_pd._around_transfer_data
    xfer(lambda m, s, b: 0, mgr, "s", blocks)  # aux / state outside a KV send
    sglang_pd._around_send(lambda m, s, a, p, b, *r: xfer(lambda *x: 0, m, s, blocks), mgr, "s",
                           np.array([1]), [], np.array([2], dtype=np.int32))
    xfer(lambda m, s, b: -1, mgr, "s", blocks)  # a failed write moves nothing
    (entry,) = sglang_pd.COUNTERS.snapshot()
    assert entry["kv_bytes"] == 96 and entry["other_bytes"] == 96


def test_hold_blocks_while_the_file_exists_and_marks_itself(tmp_path):
    hold = tmp_path / "hold"
    assert sglang_pd.hold_if_requested({}) == 0.0
    assert sglang_pd.hold_if_requested({sglang_pd.HOLD_ENV: str(hold)}) == 0.0  # no file: no hold
    hold.touch()
    import threading

    threading.Timer(0.3, hold.unlink).start()
    held = sglang_pd.hold_if_requested({sglang_pd.HOLD_ENV: str(hold)})
    assert 0.25 < held < 5 and (tmp_path / "hold.held").exists()


# ------------------------------------------------------------------ PD flag rules


def cfg(**kw):
    base = dict(disaggregation_mode="decode", disaggregation_transfer_backend="mooncake",
                disaggregation_decode_enable_offload_kvcache=False,
                disaggregation_decode_host_receive_threshold=1.0,
                disaggregation_decode_retraction_backup=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, text", [
    (dict(disaggregation_mode="prefill"), "start the prefill server without --enable-helix"),
    (dict(disaggregation_transfer_backend="nixl"), "use --disaggregation-transfer-backend mooncake"),
    (dict(disaggregation_decode_enable_offload_kvcache=True),
     "--disaggregation-decode-enable-offload-kvcache"),
    (dict(disaggregation_decode_host_receive_threshold=0.5), "leave it at 1"),
    (dict(disaggregation_decode_retraction_backup="host_pool"),
     "--disaggregation-decode-retraction-backup cpu_tensor"),
], ids=["prefill", "nixl", "offload", "host-receive", "retraction-backup"])
def test_pd_refusals_name_flag_and_fix(kw, text):
    from sglang_helix.rules.pd import check_pd
    from sglang_helix.rules.server import ServerLayout

    with pytest.raises(HelixConfigError, match="Helix: --disaggregation") as err:
        check_pd(ServerLayout.of(cfg(**kw)))
    assert text in str(err.value)


def test_pd_decode_over_mooncake_is_accepted():
    from sglang_helix.rules.pd import check_pd
    from sglang_helix.rules.server import ServerLayout

    check_pd(ServerLayout.of(cfg(disaggregation_mode="null")))
    check_pd(ServerLayout.of(cfg(disaggregation_transfer_backend="mooncake_tcp",
                                 disaggregation_decode_retraction_backup="none")))
    check_pd(ServerLayout.of(cfg(disaggregation_decode_retraction_backup="cpu_tensor")))


def test_cpu_prefill_skips_the_early_cached_prefix_send_only_under_overlap():
    """SGLang's early send records a torch.cuda.Event (kills the CPU prefill scheduler); on CPU
    it is skipped and the regular sends carry the prefix."""
    from sglang_helix.srt.cpu import pd_fix

    calls = []
    original = lambda sched, req, allow_send=True: calls.append((req, allow_send))  # noqa: E731
    assert pd_fix._around_early_send(original, SimpleNamespace(enable_overlap=True), "r") is None
    assert calls == ([] if not torch.cuda.is_available() else [("r", True)])
    pd_fix._around_early_send(original, SimpleNamespace(enable_overlap=False), "r", allow_send=False)
    assert calls[-1] == ("r", False)


SGLANG_CHECKS = {"pd: the early-send hook reaches the Scheduler class": """
from sglang.srt.managers.scheduler import Scheduler
from sglang_helix.srt.cpu import pd_fix
from sglang_helix.srt.hooks import wraps_hook
assert wraps_hook(Scheduler.maybe_send_cached_prefix_chunk, pd_fix._around_early_send)
"""}


def test_cpu_pd_early_send_hook_reaches_the_scheduler(sglang_checks):
    """The AROUND hook is on SGLang's mixin; the Scheduler class that runs it inherits it."""
    sglang_checks.assert_ok("pd: the early-send hook reaches the Scheduler class")
