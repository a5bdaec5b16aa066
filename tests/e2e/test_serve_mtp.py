"""DeepSeek MTP (NEXTN) speculative decoding on real SGLang 0.5.23 CPU servers, Helix off and on.

The tiny MLA + MoE model with a DeepSeek-V3 MTP layer (`ensure_tiny_model("mla-mtp")`: the "mla"
target weights plus `model.layers.3.{enorm,hnorm,eh_proj,shared_head,...}` in DeepSeek-V3's
on-disk format, dev.mtp_models), TP 2, fp32, page 4, chunked prefill 16, `--speculative-algorithm
NEXTN --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4` (a
chain of 3 drafts per step, SGLang's DeepSeek setting). Without the plugin's CPU-engine EAGLE ops
(srt.cpu.eagle_fix) SGLang's EAGLE worker does not start on CPU.

Two rounds of the three e2e prompts (round 2 hits the radix cache: the target's and the draft
layer's cached KV are both reused) on "mtp-off" (plain TP 2) and "mtp-kvp2" (KVP 2: the target
and the MTP layer each keep their own latent pool of 1/KVP per rank with the same page colours,
and the MTP layer's attention, in the draft extend and every draft decode step, runs partial
attention + exchange on its helix backends). Both equal transformers' fp32 greedy (the target
alone: greedy speculative decoding is lossless), verify every step and accept drafts. The drafts
themselves must agree: every answer accepts the same number of drafts with Helix on and off (a
draft step attending the wrong length changes the drafts, not the tokens; it was caught this way).
"""

from __future__ import annotations

import re

import pytest
from checks import assert_all_pages_free, flush_cache, internal_state, prompt_ids, references
from helpers import e2e_marks
from servers import MTP_STEPS

from sglang_helix.dev import server as ts

pytestmark = e2e_marks(600)

MAX_NEW = 24
_ROUNDS: dict[str, list] = {}  # server name -> answers per round (for the draft comparison)


def _rounds(served) -> list:
    """Two rounds of the e2e prompts, each answer equal to the reference (once per server)."""
    if served.name not in _ROUNDS:
        prompts = prompt_ids(served.model)
        refs = references(served.model, prompts, MAX_NEW)
        flush_cache(served)
        rounds = [ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW)
                  for _ in range(2)]
        for answers in rounds:
            assert [ts.output_ids(a) for a in answers] == [r.tokens for r in refs]
        _ROUNDS[served.name] = rounds
    return _ROUNDS[served.name]


def _check_lossless_verified_and_accepted(served) -> None:
    answers = [a for r in _rounds(served) for a in r]
    for answer in answers:
        meta = answer["meta_info"]
        assert 0 < meta["spec_verify_ct"] <= MAX_NEW, meta
    assert sum(a["meta_info"]["spec_num_correct_drafts"] for a in answers) > 0


@pytest.mark.server("mtp-off")
def test_helix_off_nextn_lossless_verified_and_accepted(served):
    _check_lossless_verified_and_accepted(served)


@pytest.mark.server("mtp-kvp2")
class TestHelixNextn:
    def test_lossless_verified_and_accepted(self, served):
        _check_lossless_verified_and_accepted(served)

    def test_drafts_like_helix_off(self, served, server_factory):
        on = _rounds(served)
        off = _ROUNDS.get("mtp-off") or _rounds(server_factory.get("mtp-off"))
        for off_round, on_round in zip(off, on, strict=True):
            assert ([a["meta_info"]["spec_num_correct_drafts"] for a in on_round]
                    == [a["meta_info"]["spec_num_correct_drafts"] for a in off_round])

    def test_mtp_layer_has_its_own_sharded_pool_and_frees_it(self, served):
        _rounds(served)
        log = served.log()
        pools = re.findall(r"TP(\d)\] sglang_helix: Helix KV pool HelixMLATokenToKVPool, logical "
                           r"tokens (\d+), local rows (\d+) \(KVP rank (\d)/2\)", log)
        # per rank: the target's pool and the MTP layer's, each 1/KVP of the same logical capacity
        assert sorted(p[0] for p in pools) == ["0", "0", "1", "1"], pools
        assert all(int(rows) * 2 == int(logical) and rank == kvp
                   for rank, logical, rows, kvp in pools), pools
        assert len({p[1] for p in pools}) == 1
        assert re.search(r"replicated q projection \+ W_UK \(all heads\) in 1 MLA layers", log)
        spec = internal_state(served)["helix"]["spec"]
        assert spec["verify_steps"] > 0 and 1 <= spec["avg_accept_length"] <= MTP_STEPS + 1, spec
        assert_all_pages_free(served, 2)
