"""End to end: real SGLang 0.5.23 on CPU serving the realistic tiny MLA + MoE model
(kv_lora_rank 48 != qk_nope_head_dim 24) with --tp-size 2 --enable-helix (KVP 2, TPA 1).

Checked against transformers' fp32 greedy (`reference_greedy`) and against Helix-off TP 2
(the plugin's CPU absorbed-MLA hook, no sitecustomize): prompts spanning several pages
(page size 4), decode crossing page boundaries, concurrent requests, chunked prefill (chunks
over a cached prefix), and a radix-cached shared prefix whose cached-token count is the shared
prefix floored to the page size; the same with --helix-mla-exchange value. One server alive at a
time (class-scoped fixtures).
"""

from __future__ import annotations

import math

import pytest
from helpers import E2E_PROMPT_TEXTS, e2e_marks

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer, reference_greedy

pytestmark = e2e_marks(600)

P = 4
MAX_NEW = 16
CHUNK = 16  # --chunked-prefill-size: the 44-token prompt is prefilled in 3 chunks
START_TIMEOUT_S = 300
PROMPT_TEXTS = E2E_PROMPT_TEXTS
SHARED = 22  # tokens a follow-up request shares with an earlier one (not a page multiple)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_tiny_model("mla", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def prompts(model):
    """3, 28 and 44 tokens: up to 11 pages; 16 new tokens cross 4 page boundaries."""
    tok = load_tokenizer(model)
    return [tok.encode(text) for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def follow_up(prompts):
    """The 44-token prompt's first SHARED tokens, then a different continuation."""
    base = prompts[1]
    tail = [t for t in prompts[0] if t != base[SHARED]][:10]
    return base[:SHARED] + tail


@pytest.fixture(scope="module")
def references(model, prompts, follow_up):
    refs = reference_greedy(model, [*prompts, follow_up], MAX_NEW)
    for ref in refs:  # margins well above fp32 noise: token equality is meaningful
        assert ref.min_margin > 1e-4, ref.min_margin
    return refs


@pytest.fixture(scope="module")
def served():
    """Tokens each server produced, by server name (for the cross-server comparison)."""
    return {}


def _serve(model, extra):
    args = ["--page-size", str(P), "--chunked-prefill-size", str(CHUNK), *extra]
    return ts.launch_server(model, args, tp=2, timeout=START_TIMEOUT_S)


def _check(server, prompts, refs):
    answers = ts.generate_concurrent(server.base_url, prompts, max_new_tokens=MAX_NEW,
                                     return_logprob=True)
    got = [ts.output_ids(a) for a in answers]
    assert got == [r.tokens for r in refs], server.argv
    for answer, ref in zip(answers, refs):
        logprobs = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
        assert all(math.isclose(g, r, abs_tol=1e-3) for g, r in zip(logprobs, ref.logprobs))
    return got


def _check_shared_prefix(server, prompts, follow_up, refs):
    """The follow-up hits the radix cache for SHARED tokens floored to the page size."""
    first = ts.generate(server.base_url, prompts[1], max_new_tokens=MAX_NEW)
    assert ts.output_ids(first) == refs[1].tokens
    second = ts.generate(server.base_url, follow_up, max_new_tokens=MAX_NEW)
    assert second["meta_info"]["cached_tokens"] == SHARED // P * P
    assert ts.output_ids(second) == refs[3].tokens


class TestHelixTp2:
    """Helix KVP 2 with HOP-B (2 batch slices: the 3 concurrent requests decode as 2 + 1)."""

    @pytest.fixture(scope="class")
    def server(self, model):
        with _serve(model, ["--enable-helix", "--helix-hopb-slices", "2"]) as server:
            yield server

    def test_openai_endpoints_and_helix_state(self, server, model):
        ts.request_json(server.base_url + "/health")  # raises RequestError unless HTTP 200
        done = ts.request_json(server.base_url + "/v1/completions", {
            "model": str(model), "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert done["usage"]["completion_tokens"] >= 1
        chat = ts.request_json(server.base_url + "/v1/chat/completions", {
            "model": str(model), "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "temperature": 0})
        assert chat["choices"][0]["message"]["role"] == "assistant"
        state = ts.request_json(server.base_url + "/server_info")["internal_states"][0]["helix"]
        assert state["layout"]["mla"] and state["layout"]["kvp"] == 2
        assert state["layout"]["hopb_slices"] == 2
        assert [r["kvp_rank"] for r in state["per_kvp_rank"]] == [0, 1]
        # plain TP replicates the latent on both ranks; this Helix rank's buffers hold half the
        # pages (+ its padding page): kv_bytes = plain / KVP up to one page of latent rows
        per_token = state["plain_tp_kv_bytes_per_token"]
        assert state["kv_bytes_per_rank"] == (state["local_pool_rows"] + P) * per_token
        assert abs(state["kv_bytes_per_rank"] - state["plain_tp_kv_bytes_per_rank"] / 2) <= 2 * P * per_token

    def test_helix_mla_path_is_live(self, server):
        log = server.log(10**7)
        assert "Helix layout MLA KVP=2 x TPA=1" in log
        assert "replicated q projection + W_UK (all heads) in 3 MLA layers" in log
        assert "HelixMLATokenToKVPool" in log

    def test_concurrent_greedy_matches_transformers(self, server, prompts, references, served):
        served["helix"] = _check(server, prompts, references[:3])

    def test_shared_prefix_cached_page_floored(self, server, prompts, follow_up, references):
        _check_shared_prefix(server, prompts, follow_up, references)


class _SameTokensAsTheHelixServer:
    """Another server of the same model: transformers' tokens, equal to the Helix (latent)
    server's when it ran first, and page-floored prefix hits."""

    def test_concurrent_greedy_matches_transformers_and_helix(self, server, prompts, references,
                                                              served):
        got = _check(server, prompts, references[:3])
        if "helix" in served:
            assert got == served["helix"]

    def test_shared_prefix_cached_page_floored(self, server, prompts, follow_up, references):
        _check_shared_prefix(server, prompts, follow_up, references)


class TestHelixValueExchangeTp2(_SameTokensAsTheHelixServer):
    """--helix-mla-exchange value (W_UV replicated, values exchanged) with HOP-B 2 and
    --helix-exchange-dtype activation (the partials in the model dtype: fp32 here, so the same
    numbers; this proves the flag reaches the layout): the same tokens as transformers and as the
    latent exchange."""

    @pytest.fixture(scope="class")
    def server(self, model):
        args = ["--enable-helix", "--helix-mla-exchange", "value", "--helix-hopb-slices", "2",
                "--helix-exchange-dtype", "activation"]
        with _serve(model, args) as server:
            yield server

    def test_value_exchange_is_live(self, server):
        log = server.log(10**7)
        assert "mla_exchange=value" in log and "exchange_dtype=activation" in log
        assert "replicated W_UV (all heads, --helix-mla-exchange value) in 3 MLA layers" in log
        state = ts.request_json(server.base_url + "/server_info")["internal_states"][0]["helix"]
        assert state["layout"]["mla_exchange"] == "value"
        assert state["layout"]["exchange_dtype"] == "activation"


    def test_rank_processes_and_their_peak_rss(self, server):
        """What serving_compare's peak-RSS column reads: the TP 2 scheduler processes."""
        from sglang_helix.dev.server import peak_rss_bytes, rank_pids

        ranks = rank_pids(server.process.pid)
        assert len(ranks) == 2
        # srt.cpu.threads_fix: one torch thread per rank (its one core), logged by each rank
        assert server.log(10**7).count("sglang_helix: torch threads = 1 for this rank's cores") == 2
        assert all(peak > 100 * 2**20 for peak in peak_rss_bytes(ranks))  # a loaded model each



class TestHelixOffTp2(_SameTokensAsTheHelixServer):
    """Helix off: the plugin's CPU absorbed-MLA fix (srt.cpu.mla_fix) alone makes SGLang serve this shape."""

    @pytest.fixture(scope="class")
    def server(self, model):
        with _serve(model, []) as server:
            yield server

    def test_helix_stays_off(self, server):
        assert "Helix layout" not in server.log(10**7)

