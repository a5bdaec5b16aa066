"""Real SGLang 0.5.23 on CPU with --enable-helix on Qwen2 and Qwen3 (tiny: hidden 128, H=8, K=2,
D=16, 4 layers).

One generic model hook re-shapes Llama's, Qwen2's and Qwen3's attention classes
(srt.models.gqa.GQA_ATTENTION_CLASSES); these servers check the two Qwen classes end to end, one
server alive at a time, against transformers' fp32 greedy generation on the same weights:

- qwen2 at KVP 2 x TPA 1: qkv_proj rebuilt (replicated over the KVP ranks) with its random q/k/v
  bias, KV pages split over two ranks;
- qwen3 at KVP 1 x TPA 2: the stock "attn_tp" sharding, per-head q/k RMSNorm (random weights)
  on H/TPA = 4 query and K/TPA = 1 KV heads per rank.

Per server: concurrent prompts (3..44 tokens, up to 11 pages of 4, decodes cross page
boundaries), a repeated prompt served over its cached prefix, pages all free after /flush_cache.
Helpers (state, flush, comparisons) are tests/e2e/test_serve_gqa.py's.
"""

from __future__ import annotations


import pytest
from helpers import e2e_marks

import test_serve_gqa as gqa
from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer, reference_greedy

pytestmark = e2e_marks(600)

PAGE = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny-cache"


@pytest.mark.parametrize("kind, kvp, tpa", [("qwen2", 2, 1), ("qwen3", 1, 2)])
def test_qwen_helix_matches_transformers(cache_dir, kind, kvp, tpa):
    model = ensure_tiny_model(kind, cache_dir)
    tok = load_tokenizer(model)
    prompts = [tok.encode(text) for text in gqa.PROMPT_TEXTS]
    refs = reference_greedy(model, prompts, gqa.MAX_NEW)
    with ts.launch_server(model, gqa.helix_args(kvp, tpa, PAGE), tp=kvp * tpa,
                          timeout=gqa.START_TIMEOUT_S) as server:
        assert f"sglang_helix: Helix layout GQA KVP={kvp} x TPA={tpa}" in server.log(10**6)
        start = gqa.check_state_at_start(server, kvp, PAGE)
        answers = ts.generate_concurrent(server.base_url, prompts, max_new_tokens=gqa.MAX_NEW,
                                         return_logprob=True)
        gqa.assert_matches(answers, refs, server.argv)
        again = ts.generate(server.base_url, prompts[1], max_new_tokens=gqa.MAX_NEW,
                            return_logprob=True)
        assert again["meta_info"]["cached_tokens"] >= (len(prompts[1]) // PAGE - 1) * PAGE
        gqa.assert_matches([again], refs[1:2], server.argv)
        gqa.check_state_returns(server, start)
