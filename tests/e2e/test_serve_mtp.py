"""End to end: DeepSeek MTP (NEXTN) speculative decoding on real SGLang 0.5.23 CPU servers, lossless,
Helix off and Helix on.

The tiny MLA + MoE model with a DeepSeek-V3 MTP layer (`ensure_tiny_model("mla-mtp")`: the "mla"
target weights plus `model.layers.3.{enorm,hnorm,eh_proj,shared_head,...}` in DeepSeek-V3's
on-disk format, dev.mtp_models), TP 2, fp32, page size 4, chunked prefill 16, `--speculative-algorithm
NEXTN --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4` (a
chain of 3 drafts per step, SGLang's DeepSeek setting; chains are what Helix serves,
rules.speculative). Without the plugin's CPU-engine EAGLE ops (srt.cpu.eagle_fix) SGLang's EAGLE
worker does not start on CPU (CUDA sync in set_embed_and_head, no torch_native draft backends,
the sgl-kernel CPU tree/slot ops).

Two rounds of the three e2e prompts (round 2 hits the radix cache: the target's and the draft
layer's cached KV are both reused). Helix off (plain TP 2) and Helix on (KVP 2: the target and the
MTP layer each keep their own latent pool of 1/KVP per rank, with the same page colours, and the
MTP layer's attention, in the draft extend and in each draft decode step, runs partial attention
+ exchange on its helix backends) must both equal transformers' fp32 greedy (the target alone:
greedy speculative decoding is lossless), verify every step, and accept drafts (the random MTP
layer drafts the right token only now and then). The drafts themselves must agree too: every
answer accepts the same number of drafts with Helix on and off (a draft step attending the wrong
length, e.g. re-planned at the committed length, changes the drafts but not the tokens; it was
caught this way). 2 launches, one alive at a time.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
from helpers import checked_references, e2e_marks, e2e_prompt_ids

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model

pytestmark = e2e_marks(900)

MAX_NEW = 24
START_TIMEOUT_S = 300
COMMON = ["--page-size", "4", "--chunked-prefill-size", "16"]
STEPS = 3  # SGLang's DeepSeek setting: the MTP layer drafts a chain of 3, verified as 4 tokens
NEXTN = ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(STEPS),
         "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(STEPS + 1)]
HELIX = ["--enable-helix", "--helix-kvp-size", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_tiny_model("mla-mtp", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def prompts(model):
    return e2e_prompt_ids(model)


@pytest.fixture(scope="module")
def references(model, prompts):
    return checked_references(model, prompts, MAX_NEW)


def _serve(model, prompts, extra):
    """Two rounds, then /flush_cache: (answers per round, /server_info internal state before the
    flush, after it, the server log)."""
    with ts.launch_server(model, [*COMMON, *NEXTN, *extra], tp=2, timeout=START_TIMEOUT_S) as server:
        rounds = [ts.generate_concurrent(server.base_url, prompts, max_new_tokens=MAX_NEW) for _ in range(2)]
        before = ts.request_json(server.base_url + "/server_info")["internal_states"][0]
        req = urllib.request.Request(server.base_url + "/flush_cache", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        after = ts.request_json(server.base_url + "/server_info")["internal_states"][0]
        return rounds, before, after, server.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def helix_off(model, prompts):
    return _serve(model, prompts, [])


@pytest.fixture(scope="module")
def helix_on(model, prompts):
    return _serve(model, prompts, HELIX)


@pytest.mark.parametrize("which", ["helix_off", "helix_on"])
def test_nextn_is_lossless(which, references, request):
    rounds = request.getfixturevalue(which)[0]
    for answers in rounds:
        assert [ts.output_ids(a) for a in answers] == [r.tokens for r in references]


@pytest.mark.parametrize("which", ["helix_off", "helix_on"])
def test_every_step_verified_and_drafts_accepted(which, request):
    answers = [a for r in request.getfixturevalue(which)[0] for a in r]
    for answer in answers:
        meta = answer["meta_info"]
        assert meta["spec_verify_ct"] > 0 and meta["spec_verify_ct"] <= MAX_NEW, meta
    assert sum(a["meta_info"]["spec_num_correct_drafts"] for a in answers) > 0


def test_helix_drafts_like_helix_off(helix_off, helix_on):
    for off_round, on_round in zip(helix_off[0], helix_on[0]):
        off = [a["meta_info"]["spec_num_correct_drafts"] for a in off_round]
        assert [a["meta_info"]["spec_num_correct_drafts"] for a in on_round] == off


def test_helix_mtp_layer_has_its_own_sharded_pool_and_frees_it(helix_on):
    _, before, after, log = helix_on
    pools = re.findall(r"TP(\d)\] sglang_helix: Helix KV pool HelixMLATokenToKVPool, logical tokens (\d+), "
                       r"local rows (\d+) \(KVP rank (\d)/2\)", log)
    # per rank: the target's pool and the MTP layer's, each 1/KVP of the same logical capacity
    assert sorted(p[0] for p in pools) == ["0", "0", "1", "1"], pools
    assert all(int(rows) * 2 == int(logical) and rank == kvp for rank, logical, rows, kvp in pools), pools
    assert len({p[1] for p in pools}) == 1
    assert re.search(r"replicated q projection \+ W_UK \(all heads\) in 1 MLA layers", log)  # the MTP layer
    spec = before["helix"]["spec"]
    assert spec["verify_steps"] > 0 and 1 <= spec["avg_accept_length"] <= STEPS + 1, spec
    ranks = after["helix"]["per_kvp_rank"]
    assert len(ranks) == 2 and all(r["free_pages"] == r["total_pages"] > 0 for r in ranks), ranks
