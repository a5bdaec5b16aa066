"""Shared test helpers: the one hook-probe interpreter and stand-ins for SGLang objects.

Dense ground truths live in sglang_helix.kernels.reference; this module holds what tests of the
SGLang glue share.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# The prompts every end-to-end server test sends (3, 28 and 44 tokens with the tiny tokenizer:
# several pages at page sizes 4 to 16).
E2E_PROMPT_TEXTS = (
    "The quick brown fox jumps over the lazy dog and then",
    "Helix parallelism shards the key value cache of a decoding request by page across ranks. "
    "Each rank",
    "Hello",
)


NEEDS_SGLANG = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang not installed")


def e2e_marks(timeout_s: int) -> list:
    """pytestmark of a real-server test module: marker sglang_e2e, skip without SGLang, a timeout."""
    return [pytest.mark.sglang_e2e, NEEDS_SGLANG, pytest.mark.timeout(timeout_s)]


# A tiny Llama config.json for tests that need SGLang to read a model's config (no weights).
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "torch_dtype": "float32", "rope_theta": 10000.0,
}


HOOK_PROBE = Path(__file__).parent / "srt" / "hook_probe.py"


class SglangChecks:
    """What the one hook-probe interpreter (tests/srt/hook_probe.py) found: facts about the
    installed hook table (`facts`) and the outcome of every collected check."""

    def __init__(self, facts: dict):
        self.facts = facts

    def assert_ok(self, name: str) -> None:
        """The check `name` (a module's SGLANG_CHECKS entry) ran without error in the probe."""
        outcome = self.facts["checks"].get(name, f"check {name!r} was not collected")
        assert outcome == "ok", outcome


def run_hook_probe(checks: dict[str, str], timeout: float = 600) -> SglangChecks:
    """Run tests/srt/hook_probe.py once: the whole hook table installed and applied in a fresh
    interpreter on the CPU engine, then every check (name -> Python source) in it."""
    # no Helix request, no CPU-fix opt-out (SGLANG_HELIX*): every row of the table is installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_HELIX")}
    env.update(SGLANG_USE_CPU_ENGINE="1", SGLANG_PLUGINS="none", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(HOOK_PROBE)], input=json.dumps({"checks": checks}),
                         capture_output=True, text=True, timeout=timeout, env=env)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stderr[-4000:]
    return SglangChecks(json.loads(line[0][len("RESULT "):]))


def fake_runner(cfg, pool, req_to_token, *, context_len: int, kv_lora_rank: int | None = None,
                device: str = "cpu", dtype=None) -> SimpleNamespace:
    """The slice of SGLang's ModelRunner a Helix backend reads (dtype: the activations', default fp32)."""
    import torch

    from sglang_helix.srt.state import CONFIG_ATTR

    return SimpleNamespace(
        device=device, dtype=dtype or torch.float32, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=pool, server_args=SimpleNamespace(**{CONFIG_ATTR: cfg}),
        model_config=SimpleNamespace(context_len=context_len, kv_lora_rank=kv_lora_rank))


def tree_mask(parents: list[int]):
    """[n, n] bool ancestor-or-self mask of a draft tree given each node's parent (-1: the root),
    the mask SGLang's tree verify attends under."""
    import torch

    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
    return mask


SUMMARY_KEY = "e2e_servers"  # the factory's timing lines, from a pytest-xdist worker


def write_summary(terminalreporter, lines: list[str]) -> None:
    """The factory's timing lines at the end of a run (growth stays visible)."""
    if lines:
        terminalreporter.write_sep("=", "e2e servers (start: launch to healthy, overlapping the "
                                        "previous row's tests)")
        for line in lines:
            terminalreporter.write_line(line)
