"""Real SGLang 0.5.23 on 4 CPU ranks with Helix inside SGLang's other parallelisms, against
transformers' fp32 greedy (tests/e2e/servers.py rows; SGLANG_CPU_OMP_THREADS_BIND "0|1|0|1": two
ranks per core):

- "mla-dpa2-kvp2": DP attention as DeepSeek runs it (--enable-dp-attention --dp-size 2, --tp-size
  4): two attention groups of 2 ranks, each one Helix group (KVP 2), the MoE FFN TP 4 over all 4
  ranks; requests on both groups (SGLang pads each batch's rows to the attention TP size: the
  Helix backend's padding rows), a cached prefix within a group (`routed_dp_rank`), /server_info:
  each group's scheduler with its own per-KVP-rank pages and its place in the layout (Helix off
  with these flags needs the plugin's CPU fix for torch_native: tests/srt/test_dp_attention_fix.py
  on SGLang's padding step; transformers' greedy stands for Helix off here, no extra server);
- "gqa-pp2-kvp2": pipeline parallel 2 x TP 2: each stage's TP group one Helix group, each stage's
  pool the pages of its layers, 1/KVP per rank;
- "gqa-dp2-kvp2": DP replicas 2 x TP 2, each replica its own Helix group, and sglang-router's
  cache-aware policy in front of them (dp-aware: each replica a worker): a request sharing a
  prefix with an earlier one goes to the replica that cached it and reuses the prefix floored to
  the page size (the granularity Helix keeps), with the reference's tokens.
"""

from __future__ import annotations

import pytest
from checks import (assert_all_pages_free, assert_greedy, flush_cache, helix_states, prompt_ids,
                    references, shared_prefix_pair)
from helpers import E2E_PROMPT_TEXTS, e2e_marks
from servers import P

from sglang_helix.dev import server as ts
from sglang_helix.dev.router import launch_cache_aware_router
from sglang_helix.dev.tiny_models import load_tokenizer

pytestmark = e2e_marks(600)

MAX_NEW = 12
SHARED = 22  # tokens a follow-up request shares with an earlier one (not a page multiple)
KVP = 2


def generate_on(served, input_ids, dp_rank: int, max_new: int = MAX_NEW) -> dict:
    """/generate pinned to DP rank `dp_rank` (SGLang's `routed_dp_rank`), with logprobs."""
    return ts.request_json(served.base_url + "/generate", {
        "input_ids": list(input_ids), "routed_dp_rank": dp_rank, "return_logprob": True,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}})


def check_groups(served, **layout) -> list[dict]:
    """Every scheduler's Helix state: 2 KVP ranks each, its place in the layout as given."""
    states = helix_states(served)
    for state in states:
        assert [r["kvp_rank"] for r in state["per_kvp_rank"]] == list(range(KVP))
        assert {k: state["parallel"][k] for k in layout} == layout, state["parallel"]
    return states


def greedy_and_cached_prefix(served, groups: int) -> None:
    """3 concurrent prompts (spread over the DP groups by SGLang's round robin), then a shared
    prefix cached and reused within each group: all the reference's tokens; every group's KVP
    ranks hold pages while requests are cached, and every page is free after /flush_cache."""
    prompts = prompt_ids(served.model)
    refs = references(served.model, prompts, MAX_NEW)
    flush_cache(served)
    answers = ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW,
                                     return_logprob=True)
    assert_greedy(answers, refs, argv=served.server.argv)
    pair = shared_prefix_pair(prompts, SHARED)
    pair_refs = references(served.model, pair, MAX_NEW)
    for dp_rank in range(groups):
        first, second = (generate_on(served, ids, dp_rank) for ids in pair)
        assert second["meta_info"]["cached_tokens"] == SHARED // P * P
        assert_greedy([first, second], pair_refs, argv=served.server.argv)
    for state in helix_states(served):
        assert all(r["used_pages"] > 0 for r in state["per_kvp_rank"]), state["per_kvp_rank"]
    assert_all_pages_free(served, KVP)


@pytest.mark.server("mla-dpa2-kvp2")
class TestDpAttention:
    def test_each_attention_group_is_a_helix_group(self, served):
        log = served.log()
        assert ("Helix layout MLA KVP=2 x TPA=1" in log and "in each of 2 DP-attention groups; "
                "FFN MoE TP 4 x EP 1 = 4 (4 experts)" in log)
        for group in (0, 1):
            assert log.count(f"of attention group {group}/2") == 2  # its 2 ranks
        states = check_groups(served, attn_dp_size=2, attention_groups=2, tp_size=4, pp_size=1)
        assert sorted(s["parallel"]["attention_group"] for s in states) == [0, 1]
        assert all(s["layout"]["world_size"] == 2 for s in states)

    def test_greedy_and_cached_prefix_in_each_group(self, served):
        greedy_and_cached_prefix(served, groups=2)


@pytest.mark.server("gqa-pp2-kvp2")
class TestPipelineParallel:
    def test_each_stage_is_a_helix_group(self, served):
        log = served.log()
        assert "Helix layout GQA KVP=2 x TPA=1" in log and "in each of 2 PP stages; FFN dense TP = 2" in log
        for stage in (0, 1):
            assert log.count(f"of attention group {stage}/2") == 2  # the stage's 2 TP ranks
        (state,) = check_groups(served, pp_size=2, pp_rank=0, attention_groups=2, tp_size=2)
        assert state["parallel"]["layers"] == [0, 2]  # the first stage's pool: 2 of the 4 layers
        greedy_and_cached_prefix(served, groups=1)


@pytest.mark.server("gqa-dp2-kvp2")
class TestDpReplicas:
    def test_each_replica_is_a_helix_group(self, served):
        assert "in each of 2 DP replicas" in served.log()
        states = check_groups(served, attention_groups=1, attn_dp_size=1, tp_size=2)
        assert sorted(s["parallel"]["dp_rank"] for s in states) == [0, 1]
        greedy_and_cached_prefix(served, groups=2)

    def test_cache_aware_router_sends_a_prefix_to_the_replica_holding_its_pages(self, served, tmp_path):
        """Two prefix families through sglang-router (cache-aware, dp-aware): each family's second
        request lands on the replica that cached the first (cached_tokens = the shared prefix
        floored to the page size; on the other replica it would be 0), with the reference's
        tokens."""
        tok = load_tokenizer(served.model)
        heads = (E2E_PROMPT_TEXTS[1], E2E_PROMPT_TEXTS[0])
        families = [(head + " holds", head + " keeps") for head in heads]
        texts = [text for family in families for text in family]
        refs = references(served.model, [tok.encode(t) for t in texts], MAX_NEW)
        flush_cache(served)
        with launch_cache_aware_router([served.base_url], dp_aware=True, log_dir=tmp_path) as router:
            answers = {i: ts.generate(router.url, text=texts[i], max_new_tokens=MAX_NEW) for i in (0, 2)}
            answers.update({i: ts.generate(router.url, text=texts[i], max_new_tokens=MAX_NEW) for i in (1, 3)})
        for first, second in ((0, 1), (2, 3)):
            a, b = (tok.encode(texts[i]) for i in (first, second))
            shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            assert answers[second]["meta_info"]["cached_tokens"] == shared // P * P > 0
        for i, ref in enumerate(refs):
            assert ts.output_ids(answers[i]) == ref.tokens
        assert_all_pages_free(served, KVP)
