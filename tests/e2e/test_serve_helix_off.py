"""Real SGLang 0.5.23 on CPU, Helix OFF, against transformers' fp32 greedy reference.

Proves the harness (`sglang_helix.dev.server`, `sglang_helix.dev.tiny_models`) that the Helix
serving tests stand on. One server per (model, TP) is shared by a module's tests.

Findings pinned here (SGLang 0.5.23, `--attention-backend torch_native`, CPU):

- GQA (tiny Llama) at TP 1 and TP 2: greedy tokens identical to transformers.
- MLA: SGLang's torch_native backend has no DeepSeek dispatch handler and falls back to Triton's,
  so a prefill without cached prefix takes the MHA path (`forward_normal_core`), and
  `TorchNativeAttnBackend.forward_extend` attends the per-head q against the pool's *latent*
  buffers instead of the decompressed k/v. Consequences:
  * realistic proportions (kv_lora_rank 48 != qk_nope_head_dim 24): the first prefill crashes
    ("Expected size for first two dimensions of batch2 tensor ...") — `test_mla_realistic_plain_...`;
  * `kv_lora_rank == qk_nope_head_dim` ("mla-compat" tiny model): it serves, but attends the
    latent as k/v (wrong tokens; seen when this was first pinned, not a test any more).
  * With every forward routed to the absorbed MLA path — what the plugin's
    `srt.cpu.mla_fix` hook does on the CPU engine, Helix on or off — the
    realistic MLA + MoE model matches transformers token for token (TP 1 here; TP 2 in
    tests/e2e/test_serve_mla.py). The "plain" test opts out of that hook
    (SGLANG_HELIX_CPU_MLA_FIX=0) to pin SGLang's own behaviour.
"""

from __future__ import annotations

import math

import pytest
from helpers import E2E_PROMPT_TEXTS, e2e_marks

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer, reference_greedy

pytestmark = e2e_marks(600)

MAX_NEW = 16
START_TIMEOUT_S = 300
PROMPT_TEXTS = E2E_PROMPT_TEXTS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Paths of the tiny models (built once into a per-session cache dir)."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    return {kind: ensure_tiny_model(kind, cache) for kind in ("gqa", "mla")}


@pytest.fixture(scope="module")
def prompts(models):
    """Token ids of PROMPT_TEXTS (3, 28 and 44 tokens: several pages at page size 4 and 16)."""
    tok = load_tokenizer(models["gqa"])
    return [tok.encode(text) for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def references(models, prompts):
    """transformers fp32 greedy continuations per model kind."""
    return {kind: reference_greedy(path, prompts, MAX_NEW) for kind, path in models.items()}


def _serve(models, kind, tp, page_size, **kwargs):
    return ts.launch_server(models[kind], ["--page-size", str(page_size)], tp=tp,
                            timeout=START_TIMEOUT_S, **kwargs)


# Class scope: a server lives only while its own tests run (two live servers would share 2 cores).
@pytest.fixture(scope="class")
def gqa_tp1(models):
    with _serve(models, "gqa", 1, 4) as server:
        yield server


def assert_matches_reference(server, prompts, refs):
    """Concurrent greedy requests give the reference tokens; logprobs agree to fp32 noise."""
    answers = ts.generate_concurrent(server.base_url, prompts, max_new_tokens=MAX_NEW,
                                     return_logprob=True)
    for prompt, answer, ref in zip(prompts, answers, refs):
        # margins well above fp32 noise, so token equality is a meaningful check
        assert ref.min_margin > 1e-4, ref.min_margin
        assert ts.output_ids(answer) == ref.tokens, (len(prompt), server.argv)
        got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
        assert all(math.isclose(g, r, abs_tol=1e-3) for g, r in zip(got, ref.logprobs))


# ------------------------------------------------------------------ GQA


class TestGqaTp1:
    def test_greedy_matches_transformers(self, gqa_tp1, prompts, references):
        assert_matches_reference(gqa_tp1, prompts, references["gqa"])

    def test_http_endpoints_answer(self, gqa_tp1, models):
        _check_endpoints(gqa_tp1, models)


def test_gqa_tp2_greedy_matches_transformers(models, prompts, references):
    with _serve(models, "gqa", 2, 16) as server:
        assert_matches_reference(server, prompts, references["gqa"])


def _check_endpoints(gqa_tp1, models):
    base = gqa_tp1.base_url
    assert ts.request_json(base + "/health") is None  # 200, empty body
    text = ts.generate(base, text="Hello, world.", max_new_tokens=4)
    assert text["meta_info"]["completion_tokens"] == 4
    model = str(models["gqa"])
    comp = ts.request_json(base + "/v1/completions", {
        "model": model, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
    assert comp["usage"]["completion_tokens"] >= 1 and "text" in comp["choices"][0]
    chat = ts.request_json(base + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "temperature": 0})
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------ MLA


PLAIN_SGLANG = {"SGLANG_HELIX_CPU_MLA_FIX": "0"}


def test_mla_realistic_with_plugin_fix_matches_transformers(models, prompts, references):
    with _serve(models, "mla", 1, 4) as server:
        assert_matches_reference(server, prompts, references["mla"])


def test_mla_realistic_plain_sglang_fails_on_cpu(models):
    """SGLang's own torch_native MLA prefill cannot run kv_lora_rank != qk_nope_head_dim."""
    with pytest.raises(ts.ServerStartError) as info:
        with _serve(models, "mla", 1, 4, env=PLAIN_SGLANG):
            pass
    assert "Expected size for first two dimensions of batch2 tensor" in str(info.value)


def test_reference_greedy_runs_on_realistic_mla(references):
    """The independent reference handles the shape SGLang's plain CPU path cannot."""
    for ref in references["mla"]:
        assert len(ref.tokens) == MAX_NEW and all(math.isfinite(x) for x in ref.logprobs)
