"""What the e2e server tests check, shared by their modules: references (computed once per
session), greedy comparisons, /server_info Helix state (every scheduler's), page accounting, cache
flushes."""

from __future__ import annotations

import functools
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

from helpers import E2E_PROMPT_TEXTS

from sglang_helix.dev import server as ts

LOGPROB_TOL = 1e-3  # fp32 servers: Helix changes only the summation order of the softmax
FP8_KV_LOGPROB_TOL = 2e-3  # the floor; each fp8-KV reference widens it to its rounding envelope
FP8_KV_MIN_MARGIN = 5e-3  # fp8-KV references: margin above 2 x their tolerance plus this
FP32_MIN_MARGIN = 1e-4  # margins well above fp32 noise: token equality is meaningful


def prompt_ids(model) -> list[list[int]]:
    """E2E_PROMPT_TEXTS with the model's tokenizer: 3 prompts of different lengths."""
    from sglang_helix.dev.tiny_models import load_tokenizer

    tok = load_tokenizer(model)
    return [tok.encode(text) for text in E2E_PROMPT_TEXTS]


def references(model, prompts, max_new: int, *, fp8_kv: bool = False) -> list:
    """transformers' fp32 greedy of each prompt (KV rounded through fp8_e4m3 where the server
    stores it, with fp8_kv), each decisive; computed once per session per prompt."""
    refs = [_reference(str(model), tuple(p), max_new, fp8_kv) for p in prompts]
    for ref in refs:
        assert ref.decisive, ("greedy not decisive: pick other prompts", ref.min_margin, ref.tol)
    return refs


def decisive_prompts(model, candidates, n: int, max_new: int, *, fp8_kv: bool = False) -> list:
    """The first n candidate prompts whose greedy is decisive (see _reference), in order."""
    chosen = []
    for prompt in candidates:
        if len(chosen) < n and _reference(str(model), tuple(prompt), max_new, fp8_kv).decisive:
            chosen.append(list(prompt))
    assert len(chosen) == n, f"only {len(chosen)} of {len(candidates)} candidates decisive, {n} needed"
    return chosen


@functools.cache
def _reference(model: str, prompt: tuple[int, ...], max_new: int, fp8_kv: bool):
    """One reference with `tol` (its logprobs' tolerance) and `decisive` (its greedy margin clears
    what the server's numerics may move): under fp8 KV both come from the prompt's own rounding
    envelope (fp8_kv_rounding_envelope), which no fixed tolerance bounds."""
    from sglang_helix.dev.fp8_models import fp8_kv_reference_greedy
    from sglang_helix.dev.tiny_models import reference_greedy

    if not fp8_kv:
        (ref,) = reference_greedy(model, [list(prompt)], max_new)
        tol, decisive = LOGPROB_TOL, ref.min_margin > FP32_MIN_MARGIN
    else:
        (ref,) = fp8_kv_reference_greedy(model, [list(prompt)], max_new)
        tol = max(FP8_KV_LOGPROB_TOL, 1.5 * ref.envelope)
        decisive = ref.min_margin > FP8_KV_MIN_MARGIN + 2 * tol
    return SimpleNamespace(tokens=list(ref.tokens), logprobs=list(ref.logprobs),
                           min_margin=ref.min_margin, tol=tol, decisive=decisive)


def assert_greedy(answers, refs, *, argv=()) -> None:
    """Each answer's tokens equal its reference's (lengths checked); logprobs within ref.tol."""
    assert len(answers) == len(refs), (len(answers), len(refs))
    for answer, ref in zip(answers, refs):
        assert ts.output_ids(answer) == ref.tokens, argv
        logprobs = answer["meta_info"].get("output_token_logprobs")
        if logprobs is not None:
            got = [entry[0] for entry in logprobs]
            assert len(got) == len(ref.logprobs)
            worst = max(abs(g - r) for g, r in zip(got, ref.logprobs))
            assert worst <= ref.tol, (f"logprob off by {worst:.2e} > {ref.tol:.1e}", got, ref.logprobs, argv)


def helix_state(served) -> dict:
    """The "helix" entry of /server_info (scheduler rank 0's view: every KVP rank's pages)."""
    return internal_state(served)["helix"]


def internal_state(served) -> dict:
    return ts.request_json(served.base_url + "/server_info")["internal_states"][0]


def helix_states(served) -> list[dict]:
    """The "helix" entry of every scheduler of /server_info: one per DP replica or DP-attention
    group (each its own Helix group), one for a single scheduler (PP: its first stage's)."""
    return [s["helix"] for s in ts.request_json(served.base_url + "/server_info")["internal_states"]]


def flush_cache(served, timeout: float = 30) -> None:
    """POST /flush_cache (answers plain text, 200 once the cache was flushed). SGLang answers 400
    while work is pending (HiCache: backups to host or storage still in flight): retried."""
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(served.base_url + "/flush_cache", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert resp.status == 200
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 400 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def free_pages(served) -> list[int]:
    return [r["free_pages"] for r in helix_state(served)["per_kvp_rank"]]


def _tiers(state: dict) -> list[list[dict]]:
    """The per-KVP-rank pages of each KV tier: the device pool, and the HiCache host pool if on."""
    return [state["per_kvp_rank"]] + ([state["host"]["per_kvp_rank"]] if "host" in state else [])


def assert_all_pages_free(served, kvp: int) -> None:
    """After /flush_cache: every page of every KVP rank of every scheduler (DP replica,
    DP-attention group) is free again, on the device and (with HiCache) on the host (waits for the
    schedulers to finish releasing, 30 s at most)."""
    flush_cache(served)
    deadline = time.monotonic() + 30

    def all_free(tiers):
        return all(r["free_pages"] == r["total_pages"] > 0 for ranks in tiers for r in ranks)

    while True:
        states = helix_states(served)
        tiers = [ranks for state in states for ranks in _tiers(state)]
        if all_free(tiers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(len(ranks) == kvp for ranks in tiers) and all_free(tiers), tiers


def assert_every_rank_used(served) -> None:
    """While requests' KV is cached: every KVP rank holds some of its pages."""
    ranks = helix_state(served)["per_kvp_rank"]
    assert all(r["used_pages"] > 0 for r in ranks), ranks


def check_kv_bytes(state: dict, page: int, item_bytes: int | None = None) -> None:
    """KV bytes of this Helix rank (its pool's real buffers) against a plain-TP rank on the same
    N = KVP x TPA ranks for the same logical capacity (the plugin's formula, kv_size): a Helix
    rank holds K/TPA KV heads (MLA: the latent) for 1/KVP of the tokens, a plain-TP rank
    ceil(K/N) heads (MLA: the latent) for all of them."""
    lay = state["layout"]
    kvp, tpa, n = lay["kvp"], lay["tpa"], lay["world_size"]
    k = lay["num_kv_heads"]
    plain_heads = 1 if lay["mla"] else -(-k // n)
    helix_heads = 1 if lay["mla"] else k // tpa
    helix_per_row = state["plain_tp_kv_bytes_per_token"] * helix_heads // plain_heads
    # the buffers hold local_pool_rows + one padding page
    assert state["kv_bytes_per_rank"] == (state["local_pool_rows"] + page) * helix_per_row
    expected = state["plain_tp_kv_bytes_per_rank"] * helix_heads / (kvp * plain_heads)
    assert abs(state["kv_bytes_per_rank"] - expected) <= 2 * page * helix_per_row, state
    assert abs(state["local_pool_rows"] * kvp - state["logical_tokens"]) <= kvp * page
    if item_bytes is not None:
        assert state["kv_bytes_per_rank"] % item_bytes == 0


def shared_prefix_pair(prompts, shared: int):
    """Two prompts sharing their first `shared` tokens (not a page multiple): the 44-token prompt's
    head, then two different tails."""
    base = prompts[1][:shared]
    return [base + [11, 12, 13], base + [21, 22, 23, 24, 25, 26]]


def run_shared_prefix(served, pair, refs, max_new: int, page: int):
    """The second request reuses floor(shared / P) * P cached tokens (the page, not P x KVP) and
    still gives the reference tokens (extend over a KV-sharded cached prefix)."""
    flush_cache(served)
    first = ts.generate(served.base_url, pair[0], max_new_tokens=max_new, return_logprob=True)
    second = ts.generate(served.base_url, pair[1], max_new_tokens=max_new, return_logprob=True)
    shared = next(i for i, (a, b) in enumerate(zip(*pair)) if a != b)
    assert second["meta_info"]["cached_tokens"] == shared // page * page
    assert_greedy([first, second], refs, argv=served.server.argv)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
