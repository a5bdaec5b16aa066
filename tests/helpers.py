"""Shared test helpers: fresh-interpreter hook checks and stand-ins for SGLang objects.

Dense ground truths live in sglang_helix.kernels.reference; this module holds what tests of the
SGLang glue share.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

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
                device: str = "cpu") -> SimpleNamespace:
    """The slice of SGLang's ModelRunner a Helix backend reads."""
    from sglang_helix.srt.state import CONFIG_ATTR

    return SimpleNamespace(
        device=device, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=pool, server_args=SimpleNamespace(**{CONFIG_ATTR: cfg}),
        model_config=SimpleNamespace(context_len=context_len, kv_lora_rank=kv_lora_rank))
