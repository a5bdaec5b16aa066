"""Real SGLang 0.5.23 on CPU with --enable-helix, GQA (tiny Llama: H=8, K=2, D=16, 4 layers).

Each layout gets one server (one alive at a time) and is compared with transformers' fp32 greedy
generation on the same weights (tests/e2e/test_serve_helix_off.py shows Helix-off SGLang equals
that reference token for token at TP 1 and TP 2, so "equal to the reference" is "equal to Helix
off"). Logprob tolerance: 1e-3 absolute (fp32; Helix changes only the summation order of the
attention softmax, measured differences are ~1e-6).

Covered per layout: concurrent requests with prompts spanning several pages and decodes crossing
page boundaries; a shared prefix whose second request reports cached_tokens = prefix floored to
the page size P (not P x KVP) and still generates the reference tokens (extend over a cached
prefix: partial attention over local prefix pages + one exchange); chunked prefill (KVP 2 x
TPA 1 runs with --chunked-prefill-size 16, so long prompts are prefilled in chunks over their own
cached KV); Helix state in /server_info: per-rank pool = 1/KVP of the logical capacity (+-1
page), its KV bytes against a plain-TP rank's (equal for N <= K, plain x K/N for N > K), free
pages back to the start after finished and aborted requests and /flush_cache.
A small pool (--max-total-tokens 256) forces radix-cache eviction (KVP 2 x TPA 1).
"""

from __future__ import annotations

import math
import random
import threading
import time
import urllib.request

import pytest
from helpers import E2E_PROMPT_TEXTS, e2e_marks

from sglang_helix.dev import engine
from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer, reference_greedy

pytestmark = e2e_marks(900)

MAX_NEW = 10
LOGPROB_TOL = 1e-3
START_TIMEOUT_S = 300
PROMPT_TEXTS = E2E_PROMPT_TEXTS
SHARED = 30  # shared-prefix length (not a multiple of the page size)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_tiny_model("gqa", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def prompts(model):
    """3 concurrent prompts (3..44 tokens) and two prompts sharing their first SHARED tokens."""
    tok = load_tokenizer(model)
    main = [tok.encode(text) for text in PROMPT_TEXTS]
    base = main[1][:SHARED]
    return {"main": main, "shared": [base + [11, 12, 13], base + [21, 22, 23, 24, 25, 26]]}


@pytest.fixture(scope="module")
def references(model, prompts):
    return {k: reference_greedy(model, v, MAX_NEW) for k, v in prompts.items()}


def helix_args(kvp: int, tpa: int, page: int, *extra: str) -> list[str]:
    return ["--page-size", str(page), "--enable-helix", "--helix-kvp-size", str(kvp),
            "--helix-tpa-size", str(tpa), *extra]


def helix_state(server) -> dict:
    """The "helix" entry /server_info reports (scheduler rank 0's view)."""
    info = ts.request_json(server.base_url + "/server_info")
    return info["internal_states"][0]["helix"]


def flush_cache(server) -> None:
    """POST /flush_cache (answers plain text, 200 when the cache was flushed)."""
    req = urllib.request.Request(server.base_url + "/flush_cache", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200


def free_pages(server) -> list[int]:
    return [r["free_pages"] for r in helix_state(server)["per_kvp_rank"]]


def assert_matches(answers, refs, argv) -> None:
    for answer, ref in zip(answers, refs):
        assert ref.min_margin > 1e-4, ref.min_margin  # token equality is meaningful
        assert ts.output_ids(answer) == ref.tokens, argv
        got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
        assert all(math.isclose(g, r, abs_tol=LOGPROB_TOL) for g, r in zip(got, ref.logprobs))


def check_kv_bytes(state: dict, kvp: int, page: int) -> None:
    """KV bytes of this Helix rank (its pool's real buffers) against a plain-TP rank on the same
    N = KVP x TPA ranks for the same logical capacity: a Helix rank holds K/TPA KV heads for
    1/KVP of the tokens, a plain-TP rank ceil(K/N) heads (one replicated head when N > K) for
    all of them. K = 2 here, so KVP 2 x TPA 1 and KVP 1 x TPA 2 (N = K) hold the same bytes as
    plain TP 2 and KVP 2 x TPA 2 (N = 4 > K) half of plain TP 4's."""
    lay = state["layout"]
    k, tpa, n = lay["num_kv_heads"], lay["tpa"], lay["world_size"]
    plain_heads = -(-k // n)
    helix_per_row = state["plain_tp_kv_bytes_per_token"] * (k // tpa) // plain_heads
    # the buffers hold local_pool_rows + one padding page of K/TPA heads x (D + Dv) x layers
    assert state["kv_bytes_per_rank"] == (state["local_pool_rows"] + page) * helix_per_row
    expected = state["plain_tp_kv_bytes_per_rank"] * (k // tpa) / (kvp * plain_heads)
    assert abs(state["kv_bytes_per_rank"] - expected) <= 2 * page * helix_per_row, state
    if n > k:
        assert state["kv_bytes_per_rank"] < 0.6 * state["plain_tp_kv_bytes_per_rank"], state


def check_state_at_start(server, kvp: int, page: int) -> list[int]:
    """Layout in /server_info; per-rank pool 1/KVP of the logical capacity (+-1 page); after
    /flush_cache (the warm-up request stays cached otherwise) every page of every rank is free."""
    flush_cache(server)
    state = helix_state(server)
    assert state["layout"]["kvp"] == kvp and state["page_size"] == page
    assert abs(state["local_pool_rows"] * kvp - state["logical_tokens"]) <= kvp * page
    check_kv_bytes(state, kvp, page)
    ranks = state["per_kvp_rank"]
    assert len(ranks) == kvp and all(r["free_pages"] == r["total_pages"] > 0 for r in ranks)
    return free_pages(server)


def run_shared_prefix(server, prompts, references, page: int) -> None:
    """Second request reuses floor(SHARED / P) * P cached tokens and still matches."""
    first, second = prompts["shared"]
    a = ts.generate(server.base_url, first, max_new_tokens=MAX_NEW, return_logprob=True)
    b = ts.generate(server.base_url, second, max_new_tokens=MAX_NEW, return_logprob=True)
    assert b["meta_info"]["cached_tokens"] == (SHARED // page) * page
    assert_matches([a, b], references["shared"], server.argv)


def abort_one_request(server, prompt) -> None:
    """Start a long request, abort everything while it decodes."""
    errors: list[Exception] = []

    def run():
        try:
            ts.generate(server.base_url, prompt, max_new_tokens=400)
        except Exception as exc:  # aborted requests may answer with an error status
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    ts.request_json(server.base_url + "/abort_request", {"abort_all": True})
    thread.join(timeout=120)
    assert not thread.is_alive()


def check_state_returns(server, start: list[int]) -> None:
    flush_cache(server)
    deadline = time.monotonic() + 30
    while free_pages(server) != start and time.monotonic() < deadline:
        time.sleep(0.5)
    assert free_pages(server) == start


def serve_and_check(model, prompts, references, *, kvp, tpa, page, extra=(), abort=True):
    args = helix_args(kvp, tpa, page, *extra)
    with ts.launch_server(model, args, tp=kvp * tpa, timeout=START_TIMEOUT_S) as server:
        assert "sglang_helix: Helix layout GQA KVP=%d x TPA=%d" % (kvp, tpa) in server.log(10**6)
        start = check_state_at_start(server, kvp, page)
        answers = ts.generate_concurrent(server.base_url, prompts["main"], max_new_tokens=MAX_NEW,
                                         return_logprob=True)
        assert_matches(answers, references["main"], server.argv)
        assert any(u > 0 for u in (r["used_pages"] for r in helix_state(server)["per_kvp_rank"]))
        run_shared_prefix(server, prompts, references, page)
        if abort:
            abort_one_request(server, prompts["main"][0])
        check_state_returns(server, start)


def test_kvp2_tpa1_tp2_chunked_prefill(model, prompts, references):
    serve_and_check(model, prompts, references, kvp=2, tpa=1, page=4,
                    extra=("--chunked-prefill-size", "16"))


def test_kvp2_tpa2_tp4(model, prompts, references):
    serve_and_check(model, prompts, references, kvp=2, tpa=2, page=4, abort=False)


EVICT_TOTAL_TOKENS = 256
EVICT_PROMPTS, EVICT_PROMPT_LEN = 8, 40


def distinct_prompts(n: int, length: int) -> list[list[int]]:
    """n seeded random prompts with distinct first tokens (no shared prefix in the radix tree)."""
    rng = random.Random(0)
    return [[20 + i] + [rng.randrange(20, 370) for _ in range(length - 1)] for i in range(n)]


def test_kvp2_tpa1_radix_eviction_small_pool(model):
    """8 distinct 50-token requests (40 prompt + 10 new), two at a time, through a 256-token
    pool: finished requests stay in the radix cache until later ones need their pages, so the
    oldest are evicted. Outputs match the reference; re-sent, the first prompt is recomputed
    (cached_tokens 0) while the last one is still cached, both match; after /flush_cache every KVP rank's pages are all free."""
    prompts = distinct_prompts(EVICT_PROMPTS, EVICT_PROMPT_LEN)
    refs = reference_greedy(model, prompts, MAX_NEW)
    args = helix_args(2, 1, 4, "--max-total-tokens", str(EVICT_TOTAL_TOKENS))
    with ts.launch_server(model, args, tp=2, timeout=START_TIMEOUT_S) as server:
        start = check_state_at_start(server, 2, 4)
        assert sum(len(p) + MAX_NEW for p in prompts) > 1.5 * helix_state(server)["logical_tokens"]
        for i in range(0, len(prompts), 2):
            answers = ts.generate_concurrent(server.base_url, prompts[i:i + 2],
                                             max_new_tokens=MAX_NEW, return_logprob=True)
            assert_matches(answers, refs[i:i + 2], server.argv)
        oldest, newest = (ts.generate(server.base_url, prompts[i], max_new_tokens=MAX_NEW,
                                      return_logprob=True) for i in (0, -1))
        assert oldest["meta_info"]["cached_tokens"] == 0  # evicted
        assert newest["meta_info"]["cached_tokens"] >= EVICT_PROMPT_LEN - 4  # still cached
        assert_matches([oldest, newest], [refs[0], refs[-1]], server.argv)
        check_state_returns(server, start)
        assert all(r["free_pages"] == r["total_pages"] for r in helix_state(server)["per_kvp_rank"])


def test_engine_users_turn_helix_on_with_sglang_helix_env(model, prompts, references):
    """sglang.Engine(...) takes no unknown kwargs: Engine users set SGLANG_HELIX (docs/usage.md)."""
    env = {"SGLANG_HELIX": "--enable-helix --helix-kvp-size 2 --helix-tpa-size 1"}
    out = engine.run_engine(model, prompts["main"], MAX_NEW, tp=2, overrides={"page_size": 4},
                        env=env, timeout=START_TIMEOUT_S)
    assert out.helix is not None and out.helix["layout"]["kvp"] == 2, out.helix
    assert out.output_ids == [ref.tokens for ref in references["main"]]
