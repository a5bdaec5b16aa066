"""Real SGLang 0.5.23 on CPU serving the realistic tiny DeepSeek-V3-style MLA + MoE model
(kv_lora_rank 48 != qk_nope_head_dim 24; 4 routed experts, top-2, 1 shared), TP 2, page 4,
chunked prefill 16 (the 44-token prompt in 3 chunks over its own cached prefix), against
transformers' fp32 greedy on the same weights (logprobs within 1e-3; fp8 KV pages: the reference
rounds the cached KV through fp8, within 2e-3):

- "mla-kvp2": Helix KVP 2, latent exchange, HOP-B 2 slices (3 concurrent requests decode as
  2 + 1), FFN as MoE TP 1 x EP 2 on the same 2 ranks, --enable-mixed-chunk: OpenAI endpoints,
  Helix state in /server_info, the replicated q projection + W_UK, greedy, a radix-cached shared
  prefix whose cached-token count is the prefix floored to the page size, a request decoding in
  the batches of other prompts' prefill chunks (mixed batches);
- "mla-kvp2-value": --helix-mla-exchange value (W_UV replicated, values exchanged),
  --helix-exchange-dtype activation, fp8_e4m3 latent pages (1 byte per element, 1/KVP of plain
  TP's latent bytes per rank); each rank's torch threads and peak RSS;
- "mla-off": Helix off, the same model with --ep-size 2 and fp8 KV: the CPU-engine fixes
  (absorbed MLA on torch_native, native MoE with EP's -1 expert ids, fp8 KV past SGLang's AMX-only
  check) alone make SGLang serve it, equal to the reference;
- SGLang's own torch_native MLA prefill (the absorbed-MLA fix opted out) cannot run this shape.
"""

from __future__ import annotations

import threading

import pytest
from checks import (assert_all_pages_free, assert_every_rank_used,
                    assert_greedy, check_kv_bytes, flush_cache, helix_state, internal_state,
                    prompt_ids, references, run_shared_prefix, shared_prefix_pair, wait_for)
from helpers import e2e_marks
from servers import P

from sglang_helix.dev import server as ts

pytestmark = e2e_marks(600)

MAX_NEW = 12
MIXED_LONG = 32  # new tokens of the request decoding while the others prefill
SHARED = 22  # tokens a follow-up request shares with an earlier one (not a page multiple)


class _Greedy:
    """Greedy and the shared prefix against the reference (fp8-rounded KV where served so)."""

    def _fp8_kv(self, served) -> bool:
        return "fp8_e4m3" in served.spec.args

    def test_concurrent_greedy_matches_transformers(self, served):
        prompts = prompt_ids(served.model)
        fp8 = self._fp8_kv(served)
        refs = references(served.model, prompts, MAX_NEW, fp8_kv=fp8)
        flush_cache(served)
        answers = ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW,
                                         return_logprob=True)
        assert_greedy(answers, refs, argv=served.server.argv)
        if served.spec.helix:
            assert_every_rank_used(served)
            assert_all_pages_free(served, 2)

    def test_shared_prefix_cached_page_floored(self, served):
        fp8 = self._fp8_kv(served)
        pair = shared_prefix_pair(prompt_ids(served.model), SHARED)
        refs = references(served.model, pair, MAX_NEW, fp8_kv=fp8)
        run_shared_prefix(served, pair, refs, MAX_NEW, P)


@pytest.mark.server("mla-kvp2")
class TestHelixKvp2HopbEp(_Greedy):
    def test_openai_endpoints_and_helix_state(self, served):
        ts.request_json(served.base_url + "/health")  # raises RequestError unless HTTP 200
        done = ts.request_json(served.base_url + "/v1/completions", {
            "model": str(served.model), "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert done["usage"]["completion_tokens"] >= 1
        chat = ts.request_json(served.base_url + "/v1/chat/completions", {
            "model": str(served.model), "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "temperature": 0})
        assert chat["choices"][0]["message"]["role"] == "assistant"
        flush_cache(served)
        info = ts.request_json(served.base_url + "/server_info")
        state = info["internal_states"][0]["helix"]
        assert info["ep_size"] == 2
        assert state["layout"]["mla"] and state["layout"]["kvp"] == 2
        assert state["layout"]["hopb_slices"] == 2
        assert [r["kvp_rank"] for r in state["per_kvp_rank"]] == [0, 1]
        # plain TP replicates the latent on both ranks; a Helix rank's buffers hold half the pages
        check_kv_bytes(state, P)

    def test_mixed_chunk_decode_rows_ride_in_prefill_chunks(self, served):
        """--enable-mixed-chunk: a request decoding while two prompts arrive (the 44-token one in 3
        chunks of 16) decodes in the chunks' batches, each decode row a 1-token extend over its
        KV-sharded prefix in the batch's one exchange (logged); all the reference's tokens
        (no logprobs: SGLang mixes only requests that ask for none)."""
        prompts = prompt_ids(served.model)
        long_ref = references(served.model, prompts[2:], MIXED_LONG)[0]
        refs = references(served.model, prompts[:2], MAX_NEW)
        flush_cache(served)
        mixed_before = helix_state(served)["mixed_batches"]
        answers: dict = {}
        decoding = threading.Thread(target=lambda: answers.update(
            long=ts.generate(served.base_url, prompts[2], max_new_tokens=MIXED_LONG)))
        decoding.start()
        wait_for(lambda: any(r["used_pages"] for r in helix_state(served)["per_kvp_rank"]), 60,
                 "the first request's prefill")
        chunked = ts.generate_concurrent(served.base_url, prompts[:2], max_new_tokens=MAX_NEW)
        decoding.join(timeout=120)
        assert ts.output_ids(answers["long"]) == long_ref.tokens
        assert [ts.output_ids(a) for a in chunked] == [r.tokens for r in refs]
        assert helix_state(served)["mixed_batches"] > mixed_before  # counted by the helix backend
        assert "sglang_helix: mixed batch: " in served.log()
        assert_all_pages_free(served, 2)

    def test_helix_mla_path_and_ep_split_are_live(self, served):
        log = served.log()
        assert "Helix layout MLA KVP=2 x TPA=1" in log
        assert "FFN MoE TP 1 x EP 2 = 2 (4 experts)" in log
        assert "replicated q projection + W_UK (all heads) in 3 MLA layers" in log
        assert "HelixMLATokenToKVPool" in log


@pytest.mark.server("mla-kvp2-value")
class TestHelixValueExchangeFp8Kv(_Greedy):
    def test_value_exchange_and_dtype_are_live(self, served):
        log = served.log()
        assert "mla_exchange=value" in log and "exchange_dtype=activation" in log
        assert "replicated W_UV (all heads, --helix-mla-exchange value) in 3 MLA layers" in log
        state = helix_state(served)
        assert state["layout"]["mla_exchange"] == "value"
        assert state["layout"]["exchange_dtype"] == "activation"

    def test_fp8_latent_pages_are_one_byte_and_half_of_plain_tp(self, served):
        flush_cache(served)
        state = helix_state(served)
        assert state["kv_cache_dtype"] == "float8_e4m3fn"
        check_kv_bytes(state, P, item_bytes=1)
        assert abs(state["kv_bytes_per_rank"] - state["plain_tp_kv_bytes_per_rank"] / 2) \
            <= 2 * P * state["plain_tp_kv_bytes_per_token"]

    def test_rank_processes_and_their_peak_rss(self, served):
        """What serving_compare's peak-RSS column reads: the TP 2 scheduler processes."""
        from sglang_helix.dev.server import peak_rss_bytes, rank_pids

        ranks = rank_pids(served.server.process.pid)
        assert len(ranks) == 2
        # srt.cpu.threads_fix: one torch thread per rank (its one core), logged by each rank
        assert served.log().count("sglang_helix: torch threads = 1 for this rank's cores") == 2
        assert all(peak > 100 * 2**20 for peak in peak_rss_bytes(ranks))  # a loaded model each


@pytest.mark.server("mla-off")
class TestHelixOffCpuFixes(_Greedy):
    def test_helix_stays_off_and_the_cpu_fixes_serve(self, served):
        log = served.log()
        assert "Helix layout" not in log
        state = internal_state(served)
        assert "helix" not in state
        assert ts.request_json(served.base_url + "/server_info")["ep_size"] == 2
