"""EAGLE-3 and DeepSeek MTP draft trees under Helix on real SGLang 0.5.23 CPU servers, lossless.

Configurations (tests/e2e/servers.py), page 4, `--speculative-num-steps 3 --speculative-eagle-topk
2 --speculative-num-draft-tokens 4` (a draft tree: two branches per step in SGLang's page-aligned
branch layout, 4 nodes verified under the tree mask):
- "eagle3-kvp2-tree": the tiny Llama at KVP 2 x TPA 1 with its tiny EAGLE-3 draft
  (`ensure_eagle3_draft`: the real on-disk format, `fc`, `midlayer`, `d2t` / `t2d`, trained on the
  target's greedy text so its drafts are accepted). The draft layer keeps its own KV-sharded pool
  (same page colours as the target's) and its attention, in the draft extend and every tree draft
  step, runs partial attention + exchange;
- "mtp-kvp2-tree": the tiny MLA + MoE model with its DeepSeek-V3 MTP layer at KVP 2.
Two rounds of the e2e prompts (round 2 hits the radix cache: the target's and the draft's cached
KV reused). Every answer equals transformers' fp32 greedy of the target (greedy speculative
decoding is lossless, so also Helix off's answer), every step verifies, drafts are accepted (also
in /server_info's acceptance length), and after /flush_cache every page of every KVP rank is free.
"""

from __future__ import annotations

import re

import pytest
from checks import assert_all_pages_free, flush_cache, internal_state, prompt_ids, references
from helpers import e2e_marks

from sglang_helix.dev import server as ts

pytestmark = e2e_marks(600)

MAX_NEW = 12
NODES = 4  # --speculative-num-draft-tokens: the most tokens one verify step commits


def _check_tree_server(served, pool: str) -> None:
    prompts = prompt_ids(served.model)
    refs = references(served.model, prompts, MAX_NEW)
    flush_cache(served)  # also resets SGLang's speculative counters
    rounds = [ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW) for _ in range(2)]
    for answers in rounds:
        assert [ts.output_ids(a) for a in answers] == [r.tokens for r in refs], served.server.argv
    metas = [a["meta_info"] for answers in rounds for a in answers]
    assert all(0 < m["spec_verify_ct"] <= MAX_NEW for m in metas), metas
    assert sum(m["spec_num_correct_drafts"] for m in metas) > 0, metas  # drafts accepted
    state = internal_state(served)
    assert 1 < state["avg_spec_accept_length"] <= NODES, state["avg_spec_accept_length"]
    counts = state["helix"]["spec"]
    assert counts["verify_steps"] > 0 and 1 < counts["avg_accept_length"] <= NODES, counts
    # per rank: the target's pool and the draft's, each 1/KVP of the same logical capacity
    pools = re.findall(rf"TP(\d)\] sglang_helix: Helix KV pool {pool}, logical tokens (\d+), "
                       r"local rows (\d+) \(KVP rank (\d)/2\)", served.log())
    assert sorted(p[0] for p in pools) == ["0", "0", "1", "1"], pools
    assert all(int(rows) * 2 == int(logical) and rank == kvp for rank, logical, rows, kvp in pools), pools
    assert_all_pages_free(served, 2)


@pytest.mark.server("eagle3-kvp2-tree")
def test_eagle3_draft_tree_lossless_accepted_and_freed(served):
    _check_tree_server(served, r"\w+")


@pytest.mark.server("mtp-kvp2-tree")
def test_mtp_draft_tree_lossless_accepted_and_freed(served):
    _check_tree_server(served, "HelixMLATokenToKVPool")
