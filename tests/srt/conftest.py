"""The `sglang_checks` fixture: every hook check of this session in one SGLang interpreter.

A test module lists its checks as SGLANG_CHECKS = {name: Python source}; each runs after the
whole hook table is installed and applied (tests/srt/hook_probe.py), and the module's test asserts
`sglang_checks.assert_ok(name)`. The modules of the collected tests contribute, so running one
file alone still runs its own checks (and only those).
"""

from __future__ import annotations

import pytest
from helpers import run_hook_probe


@pytest.fixture(scope="session")
def sglang_checks(request):
    checks: dict[str, str] = {}
    for module in {getattr(item, "module", None) for item in request.session.items} - {None}:
        for name, code in getattr(module, "SGLANG_CHECKS", {}).items():
            assert checks.setdefault(name, code) == code, f"two checks named {name!r}"
    return run_hook_probe(checks)
