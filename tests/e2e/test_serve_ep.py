"""End to end: expert parallelism with Helix. Real SGLang 0.5.23 on CPU serving the tiny MLA + MoE
model (4 routed experts, top-2, 1 shared expert) with --tp-size 2 --ep-size 2: attention as KVP 2 x
TPA 1 with --enable-helix, the FFN as MoE TP 1 x EP 2 on the same 2 ranks (2 experts per rank).

SGLang's native CPU MoE cannot run EP at all (its -1 ids for other ranks' experts crash
`moe_forward_native`); the plugin's CPU-engine fix (srt.cpu.moe_fix) serves it, Helix on or off.
Two servers with the same flags except --enable-helix, one alive at a time (class-scoped
fixtures): both greedy token-identical to transformers' fp32 `reference_greedy` (logprobs within
1e-3) and to each other, on the e2e prompts sent concurrently (decode batches mix tokens routed
to both ranks' experts), with chunked prefill and page-boundary crossings.
"""

from __future__ import annotations

import math

import pytest
from helpers import checked_references, e2e_marks, e2e_prompt_ids

from sglang_helix.dev import server as ts
from sglang_helix.dev.tiny_models import ensure_tiny_model

pytestmark = e2e_marks(600)

P = 4
MAX_NEW = 16
CHUNK = 16  # --chunked-prefill-size: the 44-token prompt is prefilled in 3 chunks
START_TIMEOUT_S = 300
EP_ARGS = ("--ep-size", "2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_tiny_model("mla", tmp_path_factory.getbasetemp() / "tiny-cache")


@pytest.fixture(scope="module")
def prompts(model):
    return e2e_prompt_ids(model)


@pytest.fixture(scope="module")
def references(model, prompts):
    return checked_references(model, prompts, MAX_NEW)


@pytest.fixture(scope="module")
def served():
    """Tokens each server produced, by server name (for the cross-server comparison)."""
    return {}


def _serve(model, extra):
    args = ["--page-size", str(P), "--chunked-prefill-size", str(CHUNK), *EP_ARGS, *extra]
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


class _EpServer:
    name = ""

    def test_concurrent_greedy_matches_transformers(self, server, prompts, references, served):
        served[self.name] = _check(server, prompts, references)
        other = {"helix": "off", "off": "helix"}[self.name]
        if other in served:  # Helix on vs Helix off, same flags otherwise
            assert served[self.name] == served[other]


class TestHelixEp2(_EpServer):
    """--enable-helix: KVP 2 attention, MoE TP 1 x EP 2 on the same ranks."""

    name = "helix"

    @pytest.fixture(scope="class")
    def server(self, model):
        with _serve(model, ["--enable-helix"]) as server:
            yield server

    def test_layout_logged_with_the_ep_split(self, server):
        log = server.log(10**7)
        assert "Helix layout MLA KVP=2 x TPA=1" in log
        assert "FFN MoE TP 1 x EP 2 = 2 (4 experts)" in log
        state = ts.request_json(server.base_url + "/server_info")
        assert state["ep_size"] == 2 and state["internal_states"][0]["helix"]["layout"]["kvp"] == 2


class TestHelixOffEp2(_EpServer):
    """Helix off, the same flags: SGLang's EP with the plugin's CPU MoE fix alone."""

    name = "off"

    @pytest.fixture(scope="class")
    def server(self, model):
        with _serve(model, []) as server:
            yield server

    def test_helix_stays_off(self, server):
        assert "Helix layout" not in server.log(10**7)
