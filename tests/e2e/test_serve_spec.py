"""NGRAM speculative decoding on real SGLang 0.5.23 CPU servers, Helix off and on, lossless.

Configurations (tests/e2e/servers.py), page 4, `--speculative-algorithm NGRAM
--speculative-num-draft-tokens 4 --speculative-ngram-max-bfs-breadth 1` (chain drafts; SGLang
requires breadth 1 at page size > 1), `--decode-log-interval 1` (SGLang folds its speculative
counters into /server_info's `avg_spec_accept_length` only when it logs a decode batch):
- "gqa-off-ngram": tiny Llama, TP 1, Helix off. Without the plugin's CPU-engine speculative ops
  (srt.cpu.spec_fix) it does not start on CPU. It is also this suite's Helix-off harness check
  (the OpenAI endpoints answer; greedy equals transformers);
- "gqa-kvp2-ngram": tiny Llama at KVP 2 x TPA 1 (drafts verified as an extend over the
  KV-sharded prefix, partial attention + one exchange);
- "mla-kvp2-ngram": the tiny MLA + MoE model at KVP 2, chunked prefill 16 (accepted drafts'
  latents stay on their page owners: the MLA pool's move_kv_cache).
Each sends two rounds of four prompts at once (three texts and a repetitive token pattern). The
random-weight models rarely repeat themselves, so round 1's drafts are mostly rejected; in
round 2 the n-gram corpus holds round 1's continuations, so drafts are accepted. Every answer must
equal transformers' fp32 greedy (greedy speculative decoding is lossless), round 2 must accept
drafts, and after /flush_cache every page of every KVP rank is free again.
"""

from __future__ import annotations

import pytest
from checks import assert_all_pages_free, flush_cache, internal_state, prompt_ids, references
from helpers import e2e_marks

from sglang_helix.dev import server as ts

pytestmark = e2e_marks(600)

DRAFTS = 4
MAX_NEW = 40
REPETITIVE = [40, 41, 42, 43, 44, 45] * 5  # a token pattern the n-gram corpus matches at once


def _two_rounds(served) -> tuple[list, list, dict]:
    """Both rounds (answers per round), the internal state read before any flush, refs."""
    prompts = prompt_ids(served.model) + [REPETITIVE]
    refs = references(served.model, prompts, MAX_NEW)
    flush_cache(served)  # also resets SGLang's speculative counters
    rounds = [ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW)
              for _ in range(2)]
    for answers in rounds:
        assert len(answers) == len(refs)
        assert [ts.output_ids(a) for a in answers] == [r.tokens for r in refs], served.server.argv
    return rounds, internal_state(served)


def _assert_round_two_accepts(answers) -> None:
    for answer in answers:  # round 2: the corpus holds round 1's continuations
        meta = answer["meta_info"]
        assert meta["spec_num_correct_drafts"] > 0 and meta["spec_accept_length"] > 1.5, meta
        assert meta["spec_verify_ct"] < MAX_NEW - 1  # several tokens per target forward


def _assert_acceptance_reported(state: dict, rounds) -> None:
    """/server_info shows the average acceptance length: SGLang's own figure and (Helix on) the
    plugin's counters, current to the last batch."""
    assert 1 < state["avg_spec_accept_length"] <= DRAFTS, state["avg_spec_accept_length"]
    if "helix" in state:
        counts = state["helix"]["spec"]
        verified = sum(a["meta_info"]["spec_verify_ct"] for r in rounds for a in r)
        assert counts["verify_steps"] >= verified > 0, (counts, verified)
        assert counts["avg_accept_length"] == counts["accept_tokens"] / counts["verify_steps"]
        assert 1 < counts["avg_accept_length"] <= DRAFTS, counts


@pytest.mark.server("gqa-off-ngram")
class TestHelixOffNgram:
    def test_lossless_and_drafts_verified_zero_partial_and_full(self, served):
        rounds, state = _two_rounds(served)
        histogram = [0] * DRAFTS  # verify steps by number of correct drafts, over every answer
        for answers in rounds:
            for answer in answers:
                meta = answer["meta_info"]
                assert meta["spec_verify_ct"] > 0
                histogram = [a + b for a, b in zip(
                    histogram, meta["spec_correct_drafts_histogram"] + [0] * DRAFTS)]
        _assert_round_two_accepts(rounds[1])
        assert histogram[0] > 0 and histogram[DRAFTS - 1] > 0  # zero and full accepts
        assert sum(histogram[1:DRAFTS - 1]) > 0  # partial accepts
        _assert_acceptance_reported(state, rounds)
        assert "helix" not in state

    def test_http_endpoints_answer(self, served):
        base = served.base_url
        assert ts.request_json(base + "/health") is None  # 200, empty body
        text = ts.generate(base, text="Hello, world.", max_new_tokens=4)
        assert text["meta_info"]["completion_tokens"] == 4
        model = str(served.model)
        comp = ts.request_json(base + "/v1/completions", {
            "model": model, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
        assert comp["usage"]["completion_tokens"] >= 1 and "text" in comp["choices"][0]
        chat = ts.request_json(base + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0})
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("server", [pytest.param(name, marks=pytest.mark.server(name))
                                    for name in ("gqa-kvp2-ngram", "mla-kvp2-ngram")])
def test_helix_ngram_lossless_accepts_and_frees_every_page(served, server):
    """GQA and MLA at KVP 2: chain drafts verified over the KV-sharded prefix."""
    rounds, state = _two_rounds(served)
    _assert_round_two_accepts(rounds[1])
    _assert_acceptance_reported(state, rounds)
    assert_all_pages_free(served, 2)
