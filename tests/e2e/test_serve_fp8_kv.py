"""End to end: --kv-cache-dtype fp8_e4m3 with --enable-helix on real SGLang 0.5.23 CPU servers.

Tiny MLA + MoE model (kv_lora_rank 48 != qk_nope_head_dim 24) and tiny Llama GQA model (H=8,
K=2), each at --tp-size 2 = KVP 2 x TPA 1, page size 4, chunked prefill 16 (later chunks attend
the fp8 pages of earlier ones), concurrent requests, and a follow-up request that hits the radix
cache (extend over cached fp8 prefix pages).

The reference. SGLang 0.5.23's own CPU engine refuses fp8 KV at start ("CPU FP8 KV cache is only
supported for MHA" for MLA, "... requires Intel AMX support" for GQA on CPUs without AMX; pinned
by tests/srt/test_memory.py against SGLang's own configure); Helix off runs it only through the
plugin's CPU-engine fix (srt.cpu.fp8_kv_fix). So Helix on, and for MLA that Helix off too (the
reference of tests/e2e/test_serve_fp8.py's fp8-weights + fp8-KV comparison), are each compared
with an independent reference: transformers' fp32 greedy on the same
weights with every cached key/value (GQA: k after RoPE and v; MLA: the normalized latent and the
rotary k_pe) rounded through float8_e4m3fn where SGLang's pool stores it (the layer scales are 1
for these unquantized checkpoints: x.to(fp8)). 3 server launches, one alive at a time.

/server_info: kv_cache_dtype is float8_e4m3fn and every byte count is 1 byte per element.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import E2E_PROMPT_TEXTS, e2e_marks

from sglang_helix.dev import server as ts
from sglang_helix.dev.fp8_models import fp8_kv_reference_greedy as fp8_reference_greedy
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer

pytestmark = e2e_marks(600)

P = 4
MAX_NEW = 12
CHUNK = 16
SHARED = 22  # the follow-up shares this many tokens of prompt 1 (radix hit: floored to P)
START_TIMEOUT_S = 300
LOGPROB_TOL = 2e-3  # fp32 both sides; a rare fp8 rounding flip moves a logprob ~1e-3 at most
MODELS = {  # kind -> Helix flags for TP 2 = KVP 2 x TPA 1
    "mla": ["--enable-helix"],
    "gqa": ["--enable-helix", "--helix-kvp-size", "2", "--helix-tpa-size", "1"],
}
# KV bytes per token per layer (elements: 1 byte each in fp8): MLA latent R + Dr = 48 + 8;
# GQA K/TPA = 2 heads x (D + Dv) = 2 x (16 + 16)
ELEMS_PER_TOKEN_LAYER = {"mla": 56, "gqa": 64}


def _check_against(server, prompts, references):
    """The e2e prompts concurrently, then the follow-up (extend over cached fp8 prefix pages):
    tokens equal to the fp8 reference's, logprobs within LOGPROB_TOL."""
    main, follow_up = prompts
    answers = ts.generate_concurrent(server.base_url, main, max_new_tokens=MAX_NEW, return_logprob=True)
    follow = ts.generate(server.base_url, follow_up, max_new_tokens=MAX_NEW, return_logprob=True)
    assert follow["meta_info"]["cached_tokens"] == SHARED // P * P
    for answer, ref in zip([*answers, follow], references):
        assert ts.output_ids(answer) == ref.tokens
        got = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
        assert all(math.isclose(g, r, abs_tol=LOGPROB_TOL) for g, r in zip(got, ref.logprobs))


class _Fp8Case:
    kind = ""

    @pytest.fixture(scope="class")
    def model(self, tmp_path_factory):
        return ensure_tiny_model(self.kind, tmp_path_factory.getbasetemp() / "tiny-cache")

    @pytest.fixture(scope="class")
    def prompts(self, model):
        tok = load_tokenizer(model)
        main = [tok.encode(text) for text in E2E_PROMPT_TEXTS]
        base = main[1]
        follow_up = base[:SHARED] + [t for t in main[0] if t != base[SHARED]][:8]
        return main, follow_up

    @pytest.fixture(scope="class")
    def references(self, model, prompts):
        main, follow_up = prompts
        refs = fp8_reference_greedy(model, [*main, follow_up], MAX_NEW)
        for ref in refs:  # margins far above what an fp8 rounding flip moves: equality is meaningful
            assert ref.min_margin > 5e-3, ref.min_margin
        return refs

    def test_helix_on_matches_the_fp8_reference(self, model, prompts, references):
        args = ["--page-size", str(P), "--chunked-prefill-size", str(CHUNK), "--kv-cache-dtype", "fp8_e4m3",
                *MODELS[self.kind]]
        with ts.launch_server(model, args, tp=2, timeout=START_TIMEOUT_S) as server:
            _check_against(server, prompts, references)
            info = ts.request_json(server.base_url + "/server_info")["internal_states"][0]["helix"]
            log = server.log(10**7)
        pool = "HelixMLATokenToKVPool" if self.kind == "mla" else "HelixMHATokenToKVPool"
        assert pool in log and "Helix layout" in log
        # 1 byte per element: buffers = (local rows + padding page) x elements per token x layers
        layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
        per_token = ELEMS_PER_TOKEN_LAYER[self.kind] * layers
        assert info["kv_cache_dtype"] == "float8_e4m3fn"
        assert info["kv_bytes_per_rank"] == (info["local_pool_rows"] + P) * per_token
        if self.kind == "mla":  # plain TP keeps the whole latent on each rank: Helix 1/KVP of it
            assert info["plain_tp_kv_bytes_per_token"] == per_token
            assert abs(info["kv_bytes_per_rank"] - info["plain_tp_kv_bytes_per_rank"] / 2) <= 2 * P * per_token
        else:  # plain TP 2: one of the K = 2 heads per rank for every token; Helix: both, half the pages
            assert info["plain_tp_kv_bytes_per_token"] * 2 == per_token


class TestMla(_Fp8Case):
    kind = "mla"

    def test_helix_off_matches_the_fp8_reference(self, model, prompts, references):
        """Helix off with fp8 KV (the plugin's CPU-engine fix srt.cpu.fp8_kv_fix): the reference
        the bf16 fp8-checkpoint comparisons of tests/e2e/test_serve_fp8.py are made against."""
        args = ["--page-size", str(P), "--chunked-prefill-size", str(CHUNK), "--kv-cache-dtype", "fp8_e4m3"]
        with ts.launch_server(model, args, tp=2, timeout=START_TIMEOUT_S) as server:
            _check_against(server, prompts, references)
            assert "Helix layout" not in server.log(10**7)


class TestGqa(_Fp8Case):
    kind = "gqa"
