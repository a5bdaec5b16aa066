"""End to end: block-fp8 checkpoints with Helix. Real SGLang 0.5.23 on CPU serving tiny checkpoints
in the on-disk format of DeepSeek-V3 / Qwen3-FP8 (float8_e4m3fn weights + fp32 `weight_scale_inv`
per 128 x 128 block, `quantization_config.quant_method: fp8`; dev.fp8_models), bf16 activations.

SGLang alone cannot start them on this AMX-less CPU; the plugin's CPU fp8 torch path
(srt.cpu.fp8_fix) serves them, Helix on or off. Greedy tokens, Helix on vs Helix off with the
same flags otherwise, on the e2e prompts sent concurrently (page size 4, chunked prefill).
bf16 activations (SGLang's fp8 method refuses fp32) make the attention of a KV-sharded merge and
of one rank differ by bf16 rounding, so identity is required at every step where Helix off's
top-1 / top-2 logprob margin exceeds BF16_MARGIN; a prompt may part ways only at a step below it
(then its later tokens are not compared), and at least half the steps must be compared:
- "mla-fp8" (DeepSeek-V3-style MLA + MoE, fp8 experts): KVP 2 (the replicated q projection is an
  fp8 ReplicatedLinear; W_UK comes from SGLang's own fp8 kv_b_proj conversion);
- "qwen3-fp8" (GQA): KVP 2 x TPA 1 (QKV rebuilt TPA ways from the fp8 shards + scales) and
  KVP 1 x TPA 2.
One server alive at a time (class-scoped fixtures); each class compares against the Helix-off
tokens of its model (the off classes come first in the file).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import E2E_PROMPT_TEXTS, e2e_marks

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer

pytestmark = e2e_marks(900)

P = 4
MAX_NEW = 12
CHUNK = 16
BF16_MARGIN = 0.25  # nats: bf16 keeps ~3 significant digits of logits of magnitude ~10-30
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny-cache"


@pytest.fixture(scope="module")
def served():
    """Tokens of each server, by (model kind, name)."""
    return {}


def _serve(model, extra):
    args = ["--page-size", str(P), "--chunked-prefill-size", str(CHUNK), "--dtype", "bfloat16",
            *extra]
    return ts.launch_server(model, args, tp=2, timeout=START_TIMEOUT_S)


def _answers(server, model):
    """(tokens, top-1 minus top-2 logprob per step) of each e2e prompt, sent concurrently."""
    tok = load_tokenizer(model)
    prompts = [tok.encode(text) for text in E2E_PROMPT_TEXTS]

    def one(ids):
        payload = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 2,
                   "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0.0,
                                       "ignore_eos": True}}
        answer = ts.request_json(server.base_url + "/generate", payload)
        tops = answer["meta_info"]["output_top_logprobs"]
        return ts.output_ids(answer), [t[0][0] - t[1][0] for t in tops]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts))
    assert all(len(tokens) == MAX_NEW for tokens, _ in got), got
    return got


def assert_same_greedy(helix, off, argv, min_compared=0.5):
    """Token identity wherever Helix off's margin is above bf16 noise (see the module doc); at
    least `min_compared` of the steps compared (a first-step low-margin split leaves none)."""
    compared = 0
    for (tokens, _), (ref, margins) in zip(helix, off):
        for step, (a, b) in enumerate(zip(tokens, ref)):
            if a != b:
                assert margins[step] < BF16_MARGIN, (step, tokens, ref, margins, argv)
                break
            compared += 1
    assert compared >= min_compared * MAX_NEW * len(off), (compared, helix, off)


class _Fp8Server:
    kind = ""
    name = ""
    extra: tuple[str, ...] = ()
    reference = "off"  # the Helix-off server of the same model and KV dtype
    min_compared = 0.5

    @pytest.fixture(scope="class")
    def model(self, cache):
        return ensure_tiny_model(self.kind, cache)

    @pytest.fixture(scope="class")
    def server(self, model):
        with _serve(model, self.extra) as server:
            yield server

    def test_greedy(self, server, model, served):
        served[self.kind, self.name] = _answers(server, model)
        log = server.log(10**7)
        assert "Detected fp8 checkpoint" in log
        if not self.name.startswith("off"):
            assert_same_greedy(served[self.kind, self.name], served[self.kind, self.reference],
                               server.argv, self.min_compared)
            assert "Helix layout" in log
        else:
            assert "Helix layout" not in log


class TestMlaOff(_Fp8Server):
    kind, name = "mla-fp8", "off"


class TestMlaHelixKvp2(_Fp8Server):
    kind, name, extra = "mla-fp8", "kvp2", ("--enable-helix",)

    def test_fp8_q_projection_replicated(self, server):
        assert ("replicated q projection + W_UK (all heads) in 3 MLA layers (Fp8LinearMethod q "
                "projection, W_UK float8_e4m3fn -> bfloat16)") in server.log(10**7)


class TestQwen3Off(_Fp8Server):
    kind, name = "qwen3-fp8", "off"


class TestQwen3HelixKvp2Tpa1(_Fp8Server):
    kind, name, extra = "qwen3-fp8", "kvp2", ("--enable-helix",)


class TestQwen3HelixKvp1Tpa2(_Fp8Server):
    kind, name, extra = "qwen3-fp8", "tpa2", ("--enable-helix", "--helix-kvp-size", "1")
