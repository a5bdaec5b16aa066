"""serving_compare's live-server side: the warm-up request, /flush_cache with the speculative
counters read after it, the acceptance length of one run from two readings, and the alive check."""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from serving_configs import ServingCompareError


def server_warmup(base_url: str, vocab: int) -> None:
    """One short request (512-token prompt, 8 tokens) so the first measured run is not the
    server's first real prefill/decode (SGLang's own start-up warm-up is a few tokens)."""
    from sglang_helix.dev.server import generate, output_ids

    rng = random.Random(1234)
    ids = [rng.randrange(16, vocab) for _ in range(512)]
    got = output_ids(generate(base_url, ids, max_new_tokens=8))
    if len(got) != 8:
        raise ServingCompareError(f"warm-up request returned {len(got)} tokens, expected 8")


def flush_and_count(base_url: str, timeout_s: float = 60.0) -> tuple[int, int] | None:
    """POST /flush_cache until the server takes it, then read its speculative counters (an idle
    flush restarts them at 0). SGLang answers 400 while a request is still in the scheduler,
    which happens for a moment after the previous answer came back (seen after the warm-up)."""
    from sglang_helix.dev.server import request_json

    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(base_url + "/flush_cache", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60):
                break
        except urllib.error.HTTPError as exc:
            if exc.code != 400 or time.monotonic() > deadline:
                raise ServingCompareError(f"/flush_cache answered HTTP {exc.code} "
                                          f"(server not idle after {timeout_s:.0f} s?)") from exc
        time.sleep(0.5)
    return spec_counts(request_json(base_url + "/server_info"))


def check_alive(server: Any, name: str) -> None:
    if server.process.poll() is not None:
        raise ServingCompareError(
            f"{name}: server exited with code {server.process.returncode}; log "
            f"{server.log_path}:\n{server.log(3000)}")


def spec_counts(server_info: Mapping[str, Any]) -> tuple[int, int] | None:
    """(verify_steps, accept_tokens) of a Helix server's speculative counters in /server_info
    (internal_states[0]["helix"]["spec"]); None when the server runs no speculative decoding."""
    states = server_info.get("internal_states") or [{}]
    spec = (states[0].get("helix") or {}).get("spec")
    if spec is None:
        return None
    return int(spec["verify_steps"]), int(spec["accept_tokens"])


def run_accept_length(before: tuple[int, int] | None, after: tuple[int, int] | None,
                      name: str) -> float:
    """Average acceptance length of one run: tokens committed / request-steps verified between
    two readings of `spec_counts` (errors if the server reported none or verified nothing)."""
    if before is None or after is None:
        raise ServingCompareError(
            f"{name}: /server_info has no internal_states[0]['helix']['spec'] (speculative "
            f"decoding not active, or a plugin without the speculative counters)")
    steps, tokens = after[0] - before[0], after[1] - before[1]
    if steps <= 0 or tokens < steps:
        raise ServingCompareError(
            f"{name}: {steps} verify steps and {tokens} accepted tokens in the run "
            f"(counters {before} -> {after})")
    return tokens / steps
