"""End to end: NGRAM speculative decoding on a real SGLang 0.5.23 CPU server, Helix off, lossless.

Without the plugin's CPU-engine speculative ops (sglang_helix.srt.cpu.spec_fix) this server does
not start on CPU ("No module named 'sgl_kernel.speculative'", then the CPU sgl-kernel ops and
torch_native's missing TARGET_VERIFY path).

Tiny Llama GQA model, TP 1, fp32, page size 4, `--speculative-algorithm NGRAM
--speculative-num-draft-tokens 4 --speculative-ngram-max-bfs-breadth 1` (SGLang requires breadth 1
at page size > 1). The same requests go to a server without speculative decoding (same flags
otherwise): round 1 sends four prompts at once (three texts and a repetitive token pattern), round
2 sends the same four again. The random-weight model rarely repeats itself, so round 1's drafts are
mostly rejected (zero-accept verifies); in round 2 the n-gram corpus holds round 1's continuations,
so drafts are accepted (full accepts, and partial ones where the known continuation ends). Every
greedy answer must be token-identical to the server without speculative decoding, and each
answer's meta_info must show verify steps (spec_verify_ct) and, in round 2, accepted drafts
(spec_num_correct_drafts, spec_accept_length). 2 server launches, one alive at a time.

Helix on (TP 2 = KVP 2 x TPA 1, same page size): the same two rounds on a Helix server without
speculative decoding and on one with the same NGRAM flags (chain drafts: breadth 1). Helix +
NGRAM must be token-identical to Helix without it and to Helix off with NGRAM, show accepted
drafts in round 2, and leave no KV behind: after /flush_cache every page of every KVP rank is
free again (/server_info; the scheduler's own idle leak check runs under Helix as well). 2 more
launches (4 in all), one alive at a time. The Helix + NGRAM server runs with
`--decode-log-interval 1` so that SGLang's own `avg_spec_accept_length` in /server_info covers
every decode batch (SGLang folds its counters into that figure only when it logs a decode batch:
every 40 by default); it and the plugin's `helix.spec` counters (current to the last batch at any
interval) must both report an average acceptance length above 1 (read before /flush_cache, which
resets SGLang's speculative counters).

`--speculative-ngram-capacity 100000` (SGLang's default: 10 million): with the default capacity
and the harness's `--mem-fraction-static 0.05` SGLang 0.5.23 refused to start here ("Loaded weights
leave no GPU memory for the KV cache under --mem-fraction-static=0.05 ... minimum viable ...
0.0983" at TP 1, 0.1929 at TP 2: the n-gram corpus each rank allocates is counted against the
host's free memory).
"""

from __future__ import annotations

import urllib.request

import pytest
from helpers import checked_references, e2e_marks, e2e_prompt_ids

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model

pytestmark = e2e_marks(900)

P = 4
DRAFTS = 4
MAX_NEW = 40
START_TIMEOUT_S = 300
COMMON = ["--page-size", str(P)]
REPETITIVE = [40, 41, 42, 43, 44, 45] * 5  # a token pattern the n-gram corpus matches at once
NGRAM = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(DRAFTS),
         "--speculative-ngram-max-bfs-breadth", "1", "--speculative-ngram-capacity", "100000"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_tiny_model("gqa", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def prompts(model):
    return e2e_prompt_ids(model) + [REPETITIVE]


HELIX = ["--enable-helix", "--helix-kvp-size", "2", "--helix-tpa-size", "1"]


def _serve(model, prompts, extra, tp=1):
    """Both rounds on one server: [round 1 answers, round 2 answers]."""
    with ts.launch_server(model, [*COMMON, *extra], tp=tp, timeout=START_TIMEOUT_S) as server:
        return [ts.generate_concurrent(server.base_url, prompts, max_new_tokens=MAX_NEW)
                for _ in range(2)]


def _serve_helix(model, prompts, extra):
    """Both rounds on a Helix TP 2 server, then /flush_cache: (answers, per-KVP-rank pages after
    the flush, scheduler rank 0's internal state from /server_info before it)."""
    with ts.launch_server(model, [*COMMON, *HELIX, *extra], tp=2, timeout=START_TIMEOUT_S) as server:
        answers = [ts.generate_concurrent(server.base_url, prompts, max_new_tokens=MAX_NEW)
                   for _ in range(2)]
        # before the flush: /flush_cache also resets SGLang's speculative counters
        state = ts.request_json(server.base_url + "/server_info")["internal_states"][0]
        req = urllib.request.Request(server.base_url + "/flush_cache", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        info = ts.request_json(server.base_url + "/server_info")["internal_states"][0]["helix"]
        return answers, info["per_kvp_rank"], state


@pytest.fixture(scope="module")
def plain(model, prompts):
    return _serve(model, prompts, [])


@pytest.fixture(scope="module")
def spec(model, prompts, plain):  # after `plain`: one server alive at a time
    return _serve(model, prompts, NGRAM)


def test_ngram_is_lossless(plain, spec):
    for plain_round, spec_round in zip(plain, spec):
        for want, got in zip(plain_round, spec_round):
            assert len(ts.output_ids(want)) == MAX_NEW
            assert ts.output_ids(got) == ts.output_ids(want)


def test_drafts_were_verified_and_accepted(spec):
    histogram = [0] * DRAFTS  # verify steps by number of correct drafts, over every answer
    for answers in spec:
        for answer in answers:
            meta = answer["meta_info"]
            assert meta["spec_verify_ct"] > 0
            histogram = [a + b for a, b in zip(histogram, meta["spec_correct_drafts_histogram"]
                                               + [0] * DRAFTS)]
    for answer in spec[1]:  # round 2: the corpus holds round 1's continuations
        meta = answer["meta_info"]
        assert meta["spec_num_correct_drafts"] > 0 and meta["spec_accept_length"] > 1.5, meta
        # fewer verify steps than tokens: several tokens per target forward
        assert meta["spec_verify_ct"] < MAX_NEW - 1
    assert histogram[0] > 0 and histogram[DRAFTS - 1] > 0  # zero and full accepts
    assert sum(histogram[1:DRAFTS - 1]) > 0  # partial accepts


@pytest.fixture(scope="module")
def helix_plain(model, prompts, spec):  # after `spec`: one server alive at a time
    return _serve_helix(model, prompts, [])


@pytest.fixture(scope="module")
def helix_spec(model, prompts, helix_plain):
    return _serve_helix(model, prompts, [*NGRAM, "--decode-log-interval", "1"])


def test_helix_ngram_is_lossless(plain, spec, helix_plain, helix_spec):
    """Helix + NGRAM == Helix without NGRAM == Helix off with NGRAM (== Helix off without)."""
    for r in range(2):
        for i, want in enumerate(helix_plain[0][r]):
            want_ids = ts.output_ids(want)
            assert len(want_ids) == MAX_NEW
            assert ts.output_ids(helix_spec[0][r][i]) == want_ids
            assert ts.output_ids(spec[r][i]) == want_ids
            assert ts.output_ids(plain[r][i]) == want_ids


def test_helix_ngram_accepts_drafts_and_frees_every_page(helix_plain, helix_spec):
    for answer in helix_spec[0][1]:  # round 2: the corpus holds round 1's continuations
        meta = answer["meta_info"]
        assert meta["spec_num_correct_drafts"] > 0 and meta["spec_accept_length"] > 1.5, meta
        assert meta["spec_verify_ct"] < MAX_NEW - 1
    for _, ranks, _ in (helix_plain, helix_spec):
        assert len(ranks) == 2
        assert all(r["free_pages"] == r["total_pages"] > 0 for r in ranks), ranks


def test_helix_ngram_server_info_reports_acceptance_length(helix_plain, helix_spec):
    """/server_info under Helix + NGRAM shows the average acceptance length (tokens committed
    per verified request-step), SGLang's own figure and the plugin's counters; none without NGRAM."""
    state = helix_spec[2]
    counts = state["helix"]["spec"]
    verified = sum(a["meta_info"]["spec_verify_ct"] for r in helix_spec[0] for a in r)
    # the counters also hold SGLang's start-up warm-up request
    assert counts["verify_steps"] >= verified > 0, (counts, verified)
    assert counts["avg_accept_length"] == counts["accept_tokens"] / counts["verify_steps"]
    assert 1 < counts["avg_accept_length"] <= DRAFTS, counts
    assert 1 < state["avg_spec_accept_length"] <= DRAFTS, state["avg_spec_accept_length"]
    plain_state = helix_plain[2]
    assert "spec" not in plain_state["helix"] and "avg_spec_accept_length" not in plain_state


# ---------------------------------------------------------------- MLA: tiny DeepSeek-V3-style, KVP 2
# The same two rounds with Helix + NGRAM on the tiny MLA + MoE model (kv_lora_rank 48 !=
# qk_nope_head_dim 24), TP 2 = KVP 2, chunked prefill 16 (the 44-token prompt in 3 chunks), against
# transformers' fp32 greedy, which Helix off and Helix on without NGRAM match on this model
# (tests/e2e/test_serve_mla.py): the drafts are verified by the same extend over the KV-sharded
# latent prefix, and accepted drafts' latents stay on their page owners (MLA pool move_kv_cache).
# One more launch (5 in all).

MLA_CHUNK = ["--chunked-prefill-size", "16"]


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory):
    return ensure_tiny_model("mla", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def mla_prompts(mla_model):
    return e2e_prompt_ids(mla_model) + [REPETITIVE]


@pytest.fixture(scope="module")
def mla_references(mla_model, mla_prompts):
    return checked_references(mla_model, mla_prompts, MAX_NEW)


@pytest.fixture(scope="module")
def mla_helix_spec(mla_model, mla_prompts):  # the server is gone when this returns
    return _serve_helix(mla_model, mla_prompts, [*MLA_CHUNK, *NGRAM, "--decode-log-interval", "1"])


def test_mla_helix_ngram_is_lossless(mla_references, mla_helix_spec):
    for answers in mla_helix_spec[0]:
        for ref, answer in zip(mla_references, answers):
            assert ts.output_ids(answer) == ref.tokens


def test_mla_helix_ngram_accepts_drafts_and_frees_every_page(mla_helix_spec):
    answers, ranks, state = mla_helix_spec
    for answer in answers[1]:  # round 2: the corpus holds round 1's continuations
        meta = answer["meta_info"]
        assert meta["spec_num_correct_drafts"] > 0 and meta["spec_accept_length"] > 1.5, meta
        assert meta["spec_verify_ct"] < MAX_NEW - 1
    assert len(ranks) == 2
    assert all(r["free_pages"] == r["total_pages"] > 0 for r in ranks), ranks
    assert 1 < state["helix"]["spec"]["avg_accept_length"] <= DRAFTS, state["helix"]["spec"]
