"""Prefill/decode disaggregation with a Helix decode server, for real, on CPU over loopback.

Each class starts one deployment (sglang_helix.dev.pd.launch_pd): a plain prefill server
(TP 1, Helix off), a Helix decode server (TP 2 = KVP 2, decode radix cache on) and SGLang's PD
router (sglang-router); KV moves over SGLang's mooncake backend with the TCP transport. Clients
talk to the router only.

Proof per model (GQA tiny Llama, MLA tiny DeepSeek-V3-style with kv_lora 48 != qk_nope 24; the
MLA deployment runs `--kv-cache-dtype fp8_e4m3` on both sides, against an fp8-rounded reference):
- greedy tokens through router -> prefill -> Helix decode equal transformers' fp32 greedy on the
  same weights (tests/e2e/test_serve_{gqa,mla}.py show one non-disaggregated Helix server equals that same
  reference), concurrent requests, prompts of 3..44 tokens crossing pages;
- the prefill's own transfer counters (bytes mooncake was asked to write, per decode session):
  decode KVP rank r received exactly the logical pages j with j % 2 == r of every prompt, i.e.
  ~1/KVP of the prompt's KV, and byte counts = pages x the per-page bytes of one rank's pool;
- shared prefix: pages the decode server holds in its radix cache are not sent again.
Faults (GQA class, last test; the prefill holds its KV writes while a file exists, see
srt.pd.HOLD_ENV, so a transfer is provably in flight): decode killed -> the request fails
within a bounded time, the prefill stays healthy and serves a new decode server; prefill killed
-> the request fails, the decode server frees the pages it reserved on every KVP rank.
With SGLANG_HELIX_E2E_SLOW=1, GQA also runs KVP 2 x TPA 2 (a 4-rank decode server behind the
same prefill): tokens identical, each (kvp, tpa) rank registered and received its pages.
Retraction (GQA class; its decode pool holds 160 logical tokens): six concurrent requests need
~480, SGLang admits them (it counts running requests as retractable) and retracts under decode
memory pressure; with the default backup under Helix (`cpu_tensor`: each KVP rank copies out and
restores its own pages, srt.memory.retraction) every request completes (no 503), token-identical
to transformers, and every page is free afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from checks import references, wait_for
from helpers import E2E_PROMPT_TEXTS
from servers import E2E_COMMON

from sglang_helix.dev import server as ts
from sglang_helix.srt.pd import HOLD_ENV, SERVER_INFO_KEY
from sglang_helix.dev.pd import (
    FAST_FAILURE_ENV,
    LOOPBACK_ENV,
    launch_pd,
    launch_router,
    pd_args,
    server_state,
)
from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer

pytestmark = [
    pytest.mark.sglang_e2e,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang not installed"),
    pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                       reason="sglang-router not installed (scripts/install-cpu.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("mooncake") is None,
                       reason="mooncake-transfer-engine-non-cuda not installed"),
    pytest.mark.timeout(900),
]

PAGE = 4
KVP = 2
MAX_NEW = 8
COMMON = [*E2E_COMMON, "--page-size", str(PAGE), "--mem-fraction-static", "0.3"]
HELIX_DECODE = ["--enable-helix", "--helix-kvp-size", str(KVP),
                "--disaggregation-decode-enable-radix-cache"]
# a pool small enough for the retraction test; the other GQA tests fit in it
RETRACT_POOL = 160
RETRACT_NEW = 48
GQA_DECODE = [*HELIX_DECODE, "--helix-tpa-size", "1", "--max-total-tokens", str(RETRACT_POOL),
              "--num-reserved-decode-tokens", "8"]
TPA2_DECODE = [*HELIX_DECODE, "--helix-tpa-size", "2"]
SLOW_ENV = "SGLANG_HELIX_E2E_SLOW"  # opt in to the slow TPA 2 case
PROMPT_TEXTS = E2E_PROMPT_TEXTS
SHARED = 30  # shared-prefix length (not a multiple of PAGE)
FAIL_WITHIN_S = 60.0


def prompts_for(model):
    tok = load_tokenizer(model)
    main = [tok.encode(t) for t in PROMPT_TEXTS]
    base = main[1][:SHARED]
    return main, [base + [11, 12, 13], base + [21, 22, 23, 24, 25, 26]]


def bytes_per_page(model, itemsize: int = 4) -> int:
    """Bytes one decode rank stores per page (fp32: 4 per element, fp8: 1): all layers, K and V
    (GQA, TPA 1) or the latent + rope row (MLA)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    if "kv_lora_rank" in cfg:
        return layers * PAGE * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * itemsize
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return layers * 2 * PAGE * cfg["num_key_value_heads"] * head_dim * itemsize


def sent_by_rank(prefill_url: str) -> dict[int, dict]:
    """The prefill's counters per decode KVP rank (Helix peers only)."""
    state = server_state(prefill_url, SERVER_INFO_KEY) or {"sent": []}
    out = {}
    for entry in state["sent"]:
        assert entry["helix"] is not None, entry  # every decode rank registered as a Helix peer
        out[entry["helix"]["kvp_rank"]] = entry
    return out


def delta(before: dict, after: dict, key: str) -> list[int]:
    return [after.get(r, {}).get(key, 0) - before.get(r, {}).get(key, 0) for r in range(KVP)]


def owned_pages(first_page: int, tokens: int) -> list[int]:
    """Logical pages [first_page, ceil(tokens / PAGE)) per KVP owner."""
    pages = range(first_page, -(-tokens // PAGE))
    return [sum(1 for j in pages if j % KVP == r) for r in range(KVP)]


def check_transfer(pd, model, prompts, run, itemsize: int = 4) -> list:
    before = sent_by_rank(pd.prefill.base_url)
    answers = run()
    after = sent_by_rank(pd.prefill.base_url)
    expect = [sum(c) for c in zip(*(owned_pages(0, len(p)) for p in prompts))]
    pages = delta(before, after, "kv_pages")
    assert pages == expect
    got_bytes = delta(before, after, "kv_bytes")
    assert got_bytes == [n * bytes_per_page(model, itemsize) for n in expect]
    total = sum(got_bytes)
    assert all(abs(b / total - 1 / KVP) < 0.2 for b in got_bytes), got_bytes  # ~1/KVP each
    return answers


def run_and_check(pd, model, *, fp8_kv: bool = False, itemsize: int = 4):
    main, _ = prompts_for(model)
    refs = references(model, main, MAX_NEW, fp8_kv=fp8_kv)
    answers = check_transfer(pd, model, main, lambda: ts.generate_concurrent(
        pd.router_url, main, max_new_tokens=MAX_NEW), itemsize)
    assert [ts.output_ids(a) for a in answers] == [r.tokens for r in refs]


def run_shared_prefix(pd, model, *, fp8_kv: bool = False):
    """The second request's cached prefix pages stay on the decode server: only later pages move."""
    _, (first, second) = prompts_for(model)
    refs = references(model, [first, second], MAX_NEW, fp8_kv=fp8_kv)
    a = ts.generate(pd.router_url, first, max_new_tokens=MAX_NEW)
    before = sent_by_rank(pd.prefill.base_url)
    b = ts.generate(pd.router_url, second, max_new_tokens=MAX_NEW)
    after = sent_by_rank(pd.prefill.base_url)
    cached_pages = SHARED // PAGE
    assert delta(before, after, "kv_pages") == owned_pages(cached_pages, len(second))
    assert [ts.output_ids(a), ts.output_ids(b)] == [r.tokens for r in refs]


# ------------------------------------------------------------------------------- GQA


@pytest.fixture(scope="class")
def gqa(tmp_path_factory, server_factory):
    server_factory.release()  # one deployment alive at a time, no other server
    model = ensure_tiny_model("gqa", tmp_path_factory.getbasetemp() / "tiny-cache")
    hold = tmp_path_factory.mktemp("pd-hold") / "hold"
    env = {**FAST_FAILURE_ENV, HOLD_ENV: str(hold)}
    logs = tmp_path_factory.mktemp("pd-gqa-logs")
    with launch_pd(model, decode_args=GQA_DECODE, decode_tp=2,
                   common_args=COMMON, env=env, log_dir=logs) as pd:
        yield model, pd, hold, env, logs


class TestGQA:
    def test_tokens_identical_and_each_rank_gets_its_pages(self, gqa):
        model, pd, *_ = gqa
        run_and_check(pd, model)

    def test_cached_prefix_pages_are_not_sent_again(self, gqa):
        model, pd, *_ = gqa
        run_shared_prefix(pd, model)

    def test_retracted_requests_resume_with_their_kv(self, gqa):
        model, pd, *_ = gqa
        info = ts.request_json(pd.decode.base_url + "/server_info")
        assert info.get("disaggregation_decode_retraction_backup") == "cpu_tensor"
        prompts = [[(7 * i + 3 * k) % 200 + 5 for k in range(30 + 4 * i)] for i in range(6)]
        refs = [r.tokens for r in references(model, prompts, RETRACT_NEW)]
        before = retracted_count(pd.decode)
        # any non-200 answer (503 "Retracted ... without a KV backup") raises here
        answers = ts.generate_concurrent(pd.router_url, prompts, max_new_tokens=RETRACT_NEW)
        assert retracted_count(pd.decode) > before, "no retraction: the test lost its pressure"
        assert [a["meta_info"]["finish_reason"]["type"] for a in answers] == ["length"] * len(prompts)
        assert [ts.output_ids(a) for a in answers] == refs
        flush = urllib.request.Request(pd.decode.base_url + "/flush_cache", data=b"{}", method="POST")
        urllib.request.urlopen(flush, timeout=60).close()
        wait_for(lambda: all(r["free_pages"] == r["total_pages"]
                             for r in server_state(pd.decode.base_url, "helix")["per_kvp_rank"]),
                 FAIL_WITHIN_S, "every decode page free again on every KVP rank")

    @pytest.mark.skipif(os.environ.get(SLOW_ENV) != "1",
                        reason=f"adds 145-180 s on 2 CPU cores (a 4-rank decode server); "
                               f"{SLOW_ENV}=1 runs it")
    def test_tpa2_decode_behind_the_same_prefill(self, gqa):
        """KVP 2 x TPA 2 (decode --tp-size 4, one KV head per rank) behind the same TP 1 prefill:
        tokens identical, and each rank (kvp r, tpa t) registered as such and received its pages.
        (Bytes are not checked: the prefill's head-slice path, send_kvcache_slice, writes through
        engine.batch_transfer_sync directly, past the byte counter on _transfer_data.)"""
        model, pd, _, env, logs = gqa
        main, _ = prompts_for(model)
        refs = references(model, main, MAX_NEW)
        with contextlib.ExitStack() as stack:
            decode = stack.enter_context(ts.launch_server(
                model, [*COMMON, *pd_args("decode"), *TPA2_DECODE],
                tp=KVP * 2, env={**LOOPBACK_ENV, **env}, log_dir=logs))
            url, _, _ = stack.enter_context(launch_router(pd.prefill, pd.bootstrap_port, decode, logs))
            answers = ts.generate_concurrent(url, main, max_new_tokens=MAX_NEW)
        assert [ts.output_ids(a) for a in answers] == [r.tokens for r in refs]
        sent = server_state(pd.prefill.base_url, SERVER_INFO_KEY)["sent"]
        tpa2 = [e for e in sent if e["helix"] is not None and e["helix"]["tpa"] == 2]
        assert sorted((e["helix"]["kvp_rank"], e["helix"]["tpa_rank"]) for e in tpa2) == [
            (r, t) for r in range(KVP) for t in range(2)]
        expect = [sum(c) for c in zip(*(owned_pages(0, len(p)) for p in main))]
        assert [e["kv_pages"] for e in tpa2] == [expect[e["helix"]["kvp_rank"]] for e in tpa2]

    def test_faults_fail_cleanly_and_free_pages(self, gqa):
        """Runs last in the class: it kills the deployment's decode, then its prefill."""
        model, pd, hold, env, logs = gqa
        # fresh prompts: pages the decode radix cache already holds would not be sent (no hold)
        p1, p2, p3 = ([7 + i, *range(40 + 3 * i, 62 + 3 * i)] for i in range(3))
        ref = references(model, [p2], MAX_NEW)[0].tokens

        # 1. decode dies while the prefill holds the KV write
        result = start_held_request(pd.router_url, p1, hold)
        ts.kill_tree(pd.decode.process)
        release(hold)
        with contextlib.ExitStack() as stack:
            # 2.'s decode server starts while the prefill detects the dead one (it meets the
            # prefill only through the router, afterwards)
            decode = ts.start_server(model, [*COMMON, *pd_args("decode"), *GQA_DECODE],
                                     tp=2, env={**LOOPBACK_ENV, **env}, log_dir=logs)
            stack.callback(ts.kill_tree, decode.process)
            assert_failed_within(result)
            assert healthy(pd.prefill.base_url)

            # 2. the prefill still serves: a new decode server and router, a correct answer
            ts.wait_healthy(decode, ts.DEFAULT_START_TIMEOUT_S)
            url, _, _ = stack.enter_context(launch_router(pd.prefill, pd.bootstrap_port, decode, logs))
            assert ts.output_ids(ts.generate(url, p2, max_new_tokens=MAX_NEW)) == ref
            pages_free = free_pages(decode.base_url)

            # 3. prefill dies while holding: the decode fails the request and frees its pages
            result = start_held_request(url, p3, hold)
            assert used_pages(decode.base_url) > 0  # pages reserved on the decode side
            ts.kill_tree(pd.prefill.process)
            release(hold)
            assert_failed_within(result)
            assert healthy(decode.base_url)
            wait_for(lambda: free_pages(decode.base_url) == pages_free, FAIL_WITHIN_S,
                     "decode pages freed on every KVP rank")


def start_held_request(url: str, prompt, hold: Path) -> dict:
    """Create the hold file, send one request in a thread, return once the prefill holds it."""
    held = Path(str(hold) + ".held")
    held.unlink(missing_ok=True)
    hold.touch()
    result: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            result["answer"] = ts.generate(url, prompt, max_new_tokens=MAX_NEW, timeout=120)
        except Exception as exc:  # noqa: BLE001 - the failure is the expected outcome
            result["error"] = exc
        result["done_at"] = time.monotonic()
        result["took"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    wait_for(held.exists, 60, "the prefill to hold the KV write")
    result["held_at"] = time.monotonic()
    return result


def release(hold: Path) -> None:
    hold.unlink(missing_ok=True)


def assert_failed_within(result: dict) -> None:
    result["thread"].join(FAIL_WITHIN_S + 10)
    assert not result["thread"].is_alive(), "request still pending: something hangs"
    assert "error" in result, f"request succeeded after its peer died: {result.get('answer')}"
    assert result["done_at"] - result["held_at"] < FAIL_WITHIN_S


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        return resp.status == 200


def free_pages(url: str) -> list[int]:
    return [r["free_pages"] for r in server_state(url, "helix")["per_kvp_rank"]]


def used_pages(url: str) -> int:
    return sum(r["used_pages"] for r in server_state(url, "helix")["per_kvp_rank"])


# ------------------------------------------------------------------------------- MLA


FP8_KV = ["--kv-cache-dtype", "fp8_e4m3"]


@pytest.fixture(scope="class")
def mla(tmp_path_factory, server_factory):
    """MLA with fp8 KV on both sides: the plain prefill through the CPU-engine fix
    srt.cpu.fp8_kv_fix, the Helix decode pools storing 1-byte pages; mooncake moves fp8 bytes."""
    server_factory.release()
    model = ensure_tiny_model("mla", tmp_path_factory.getbasetemp() / "tiny-cache")
    with launch_pd(model, decode_args=HELIX_DECODE, decode_tp=2, common_args=[*COMMON, *FP8_KV],
                   env=FAST_FAILURE_ENV, log_dir=tmp_path_factory.mktemp("pd-mla-logs")) as pd:
        yield model, pd


class TestMLA:
    """References: transformers' fp32 greedy with every cached key/value rounded through fp8."""

    def test_tokens_identical_and_each_rank_gets_its_pages(self, mla):
        model, pd = mla
        run_and_check(pd, model, fp8_kv=True, itemsize=1)
        info = server_state(pd.decode.base_url, "helix")
        assert info["kv_cache_dtype"] == "float8_e4m3fn", info

    def test_cached_prefix_pages_are_not_sent_again(self, mla):
        model, pd = mla
        run_shared_prefix(pd, model, fp8_kv=True)


RETRACT_LOG = re.compile(r"TP0\] KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")


def retracted_count(server) -> int:
    """Requests rank 0 of the decode server retracted so far (from its log)."""
    return sum(int(n) for n in RETRACT_LOG.findall(server.log_path.read_text(errors="replace")))
