"""Real SGLang 0.5.23 on CPU with --enable-helix on GQA models, against transformers' fp32 greedy.

- "qwen2-kvp2" (tests/e2e/servers.py): tiny Qwen2 (H=8, K=2, D=16, qkv bias) at KVP 2 x TPA 1
  (QKV replicated over the KVP ranks, KV pages split over two ranks), fp8_e4m3 KV pages, page 4,
  chunked prefill 16, a 256-token pool. Reference: transformers' fp32 greedy with every cached
  key (after RoPE) and value rounded through fp8 where SGLang's pool stores them. Checked:
  concurrent requests over several pages, decodes crossing page boundaries; a shared prefix whose
  second request reports cached_tokens = the prefix floored to the page size P (not P x KVP) and
  still gives the reference (extend over a KV-sharded cached prefix); radix eviction through the
  small pool with HiCache (write-through, host ratio 2, the file tier): evicted prefixes come back
  from the host, and after a flush from the files, exact; an abort mid-decode; /server_info:
  per-rank pool 1/KVP of the logical capacity, KV bytes 1 per element against a plain-TP rank's,
  the host tier's per-rank pages, every KVP rank holding pages while requests are cached and
  every device and host page free after /flush_cache.
- "qwen3-kvp2-tpa2": tiny Qwen3 (per-head q/k RMSNorm) at KVP 2 x TPA 2 on 4 ranks (one KV head
  and 2 query heads per rank); fp32 KV, tolerance 1e-3 on logprobs.
- `sglang.Engine(...)` with SGLANG_HELIX (tiny Llama, KVP 2 x TPA 1): the offline API's way in.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from checks import (assert_all_pages_free, assert_every_rank_used, assert_greedy, decisive_prompts,
                    check_kv_bytes, flush_cache, helix_state, prompt_ids, references,
                    run_shared_prefix, shared_prefix_pair)
from helpers import e2e_marks
from servers import EVICT_POOL, P

from sglang_helix.dev import engine
from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model

pytestmark = e2e_marks(600)

MAX_NEW = 10
SHARED = 30  # shared-prefix length (not a multiple of the page size)
EVICT_PROMPTS, EVICT_PROMPT_LEN = 8, 40


def distinct_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n seeded random prompts with distinct first tokens (no shared prefix in the radix tree;
    other seeds share no page with these either: the HiCache file tier outlives /flush_cache)."""
    rng = random.Random(seed)
    return [[20 + i] + [rng.randrange(20, 370) for _ in range(length - 1)] for i in range(n)]


@pytest.mark.server("qwen2-kvp2")
class TestQwen2Kvp2Fp8Kv:
    def test_layout_and_pool_in_server_info(self, served):
        assert "sglang_helix: Helix layout GQA KVP=2 x TPA=1" in served.log()
        assert "HelixMHATokenToKVPool" in served.log()
        flush_cache(served)
        state = helix_state(served)
        assert state["layout"]["kvp"] == 2 and state["page_size"] == P
        assert state["kv_cache_dtype"] == "float8_e4m3fn"
        # K = 2 = N: a Helix rank holds both KV heads of half the pages, a plain-TP rank one
        # head of all of them: the same bytes (1 per element in fp8)
        check_kv_bytes(state, P, item_bytes=1)
        # HiCache host tier: --hicache-ratio 2 of each rank's device rows, 1/KVP of the host pages
        host = state["host"]
        assert host["layout"] == "page_first" and host["host_bytes_per_rank"] > 0
        assert host["local_pool_rows"] >= 2 * state["local_pool_rows"]
        assert abs(host["logical_tokens"] - 2 * host["local_pool_rows"]) <= 2 * P
        assert [r["kvp_rank"] for r in host["per_kvp_rank"]] == [0, 1]
        assert "Helix KV pool" in served.log() and "hierarchical KV host pool" in served.log()
        assert_all_pages_free(served, 2)

    def test_concurrent_greedy_matches_the_fp8_reference(self, served):
        # prompts of 3..44 tokens whose greedy fp8 rounding noise cannot flip
        prompts = decisive_prompts(served.model, [*prompt_ids(served.model), *distinct_prompts(4, 30, seed=1)],
                                   3, MAX_NEW, fp8_kv=True)
        refs = references(served.model, prompts, MAX_NEW, fp8_kv=True)
        answers = ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW,
                                         return_logprob=True)
        assert_greedy(answers, refs, argv=served.server.argv)
        assert_every_rank_used(served)

    def test_shared_prefix_cached_page_floored(self, served):
        pair = shared_prefix_pair(prompt_ids(served.model), SHARED)
        refs = references(served.model, pair, MAX_NEW, fp8_kv=True)
        run_shared_prefix(served, pair, refs, MAX_NEW, P)

    def test_abort_mid_decode_frees_every_page(self, served):
        """abort_all while a long request decodes: it ends early with finish_reason abort, and
        every page of every KVP rank is free again."""
        flush_cache(served)
        prompt = prompt_ids(served.model)[0]
        result: dict = {}

        def run():
            try:
                result["answer"] = ts.generate(served.base_url, prompt, max_new_tokens=200)
            except ts.RequestError as exc:  # an aborted request may answer with an error status
                result["error"] = str(exc)

        thread = threading.Thread(target=run)
        thread.start()
        _wait_until_decoding(served)
        ts.request_json(served.base_url + "/abort_request", {"abort_all": True})
        thread.join(timeout=120)
        assert not thread.is_alive()
        if "answer" in result:
            meta = result["answer"]["meta_info"]
            assert meta["finish_reason"]["type"] == "abort", meta["finish_reason"]
            assert len(ts.output_ids(result["answer"])) < 200
        else:
            assert "abort" in result["error"].lower(), result["error"]
        assert_all_pages_free(served, 2)

    def test_hicache_tiers_bring_evicted_prefixes_back_exact(self, served):
        """8 distinct 50-token requests (40 prompt + 10 new), two at a time, through the 256-token
        device pool, three rounds. Round 1 computes them all: finished requests stay cached until
        later ones need their pages (radix eviction), and every cached page is written through to
        a host page of its color on its KVP rank, and on to the file tier. Round 2 (the same
        prompts): the oldest were evicted from the device and come back from the host. After
        /flush_cache (device and host emptied; the files stay) round 3 reads the prefixes from
        the file tier. Every answer equals the fp8 reference; afterwards every device and host
        page of every rank is free."""
        flush_cache(served)
        prompts = decisive_prompts(served.model, distinct_prompts(2 * EVICT_PROMPTS, EVICT_PROMPT_LEN),
                                   EVICT_PROMPTS, MAX_NEW, fp8_kv=True)
        refs = references(served.model, prompts, MAX_NEW, fp8_kv=True)
        logical = helix_state(served)["logical_tokens"]  # --max-total-tokens, in whole pages per rank
        assert EVICT_POOL - 2 * 2 * P <= logical <= EVICT_POOL
        assert sum(len(p) + MAX_NEW for p in prompts) > 1.5 * logical

        def run_round() -> list[dict]:
            answers = []
            for i in range(0, len(prompts), 2):
                answers += ts.generate_concurrent(served.base_url, prompts[i:i + 2],
                                                  max_new_tokens=MAX_NEW, return_logprob=True)
            assert_greedy(answers, refs)
            return [a["meta_info"].get("cached_tokens_details") or {} for a in answers]

        cached = EVICT_PROMPT_LEN - P  # the prompt's whole pages but the last token's
        assert not any(run_round())  # distinct prompts: nothing cached on any tier yet
        assert all(r["used_pages"] > 0 for r in helix_state(served)["host"]["per_kvp_rank"])
        second = run_round()
        assert second[0]["device"] == 0 and second[0]["host"] >= cached, second  # evicted, back
        flush_cache(served)
        third = run_round()
        assert all(d["device"] == d["host"] == 0 for d in third), third
        assert all(d["storage"] > 0 for d in third), third
        assert_all_pages_free(served, 2)


def _wait_until_decoding(served, timeout: float = 60) -> None:
    """Until some KVP rank holds pages of a running request (the request is past its prefill)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["used_pages"] > 0 for r in helix_state(served)["per_kvp_rank"]):
            time.sleep(0.5)  # a few decode steps in
            return
        time.sleep(0.1)
    raise AssertionError("the request never reached decode")


@pytest.mark.server("qwen3-kvp2-tpa2")
class TestQwen3Kvp2Tpa2:
    def test_concurrent_greedy_and_cached_prefix_match_transformers(self, served):
        assert "sglang_helix: Helix layout GQA KVP=2 x TPA=2" in served.log()
        prompts = prompt_ids(served.model)
        refs = references(served.model, prompts, MAX_NEW)
        flush_cache(served)
        check_kv_bytes(helix_state(served), P)
        answers = ts.generate_concurrent(served.base_url, prompts, max_new_tokens=MAX_NEW,
                                         return_logprob=True)
        assert_greedy(answers, refs, argv=served.server.argv)
        assert_every_rank_used(served)
        again = ts.generate(served.base_url, prompts[1], max_new_tokens=MAX_NEW, return_logprob=True)
        assert again["meta_info"]["cached_tokens"] >= (len(prompts[1]) // P - 1) * P
        assert_greedy([again], refs[1:2])
        assert_all_pages_free(served, 2)


def test_engine_users_turn_helix_on_with_sglang_helix_env(exclusive_cpu, tiny_cache):
    """sglang.Engine(...) takes no unknown kwargs: Engine users set SGLANG_HELIX (docs/usage.md)."""
    model = ensure_tiny_model("gqa", tiny_cache)
    prompts = prompt_ids(model)
    env = {"SGLANG_HELIX": "--enable-helix --helix-kvp-size 2 --helix-tpa-size 1"}
    out = engine.run_engine(model, prompts, MAX_NEW, tp=2, overrides={"page_size": P}, env=env,
                            timeout=300)
    assert out.helix is not None and out.helix["layout"]["kvp"] == 2, out.helix
    assert out.output_ids == [ref.tokens for ref in references(model, prompts, MAX_NEW)]
