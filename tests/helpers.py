"""Shared test helpers: fresh-interpreter hook checks and stand-ins for SGLang objects.

Dense ground truths live in sglang_helix.kernels.reference; this module holds what tests of the
SGLang glue share.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


def e2e_prompt_ids(model) -> list[list[int]]:
    """E2E_PROMPT_TEXTS encoded by the tiny model's tokenizer."""
    from sglang_helix.dev.tiny_models import load_tokenizer

    tok = load_tokenizer(model)
    return [tok.encode(text) for text in E2E_PROMPT_TEXTS]


def checked_references(model, prompts, max_new: int) -> list:
    """transformers' fp32 greedy of each prompt, each with top-1 / top-2 margins well above fp32
    noise, so that token equality with a server is meaningful."""
    from sglang_helix.dev.tiny_models import reference_greedy

    refs = reference_greedy(model, prompts, max_new)
    for ref in refs:
        assert ref.min_margin > 1e-4, ref.min_margin
    return refs

HOOK_PRELUDE = (
    "import os; os.environ['SGLANG_USE_CPU_ENGINE']='1'\n"
    "from sglang_helix.srt.cpu import sgl_kernel_stub; sgl_kernel_stub.install()\n"
    "from sglang_helix.srt import hooks\n"
    "from sglang.srt.plugins.hook_registry import HookRegistry\n"
)


def check_hooks_apply(module: str, table: str, count: int, *, before: str = "", after: str = "",
                      timeout: float = 180) -> None:
    """In a fresh interpreter (HookRegistry is process-global): install `module.table` twice,
    check none is live and there are `count`, apply SGLang's hooks, check all are live.

    before / after: extra Python lines run before install / after apply (asserts of their own).
    """
    code = (HOOK_PRELUDE + f"from {module} import {table} as SPECS\n" + before
            + "hooks.install(SPECS); hooks.install(SPECS)\n"
            + f"assert len(hooks.missing_hooks(SPECS)) == len(SPECS) == {count}, hooks.missing_hooks(SPECS)\n"
            + "HookRegistry.apply_hooks()\n"
            + "assert hooks.missing_hooks(SPECS) == [], hooks.missing_hooks(SPECS)\n"
            + after + "print('OK')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def fake_runner(cfg, pool, req_to_token, *, context_len: int, kv_lora_rank: int | None = None,
                device: str = "cpu", dtype=None) -> SimpleNamespace:
    """The slice of SGLang's ModelRunner a Helix backend reads (dtype: the activations', default fp32)."""
    import torch

    from sglang_helix.srt.state import CONFIG_ATTR

    return SimpleNamespace(
        device=device, dtype=dtype or torch.float32, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=pool, server_args=SimpleNamespace(**{CONFIG_ATTR: cfg}),
        model_config=SimpleNamespace(context_len=context_len, kv_lora_rank=kv_lora_rank))
