"""The hook table (sglang_helix.srt.hook_table): every seam into SGLang listed once, installed and
live in one fresh SGLang interpreter (tests/srt/hook_probe.py), CPU-engine rows included; the CPU
fix registry behind its `cpu_fix` column; docs/sglang-integration.md lists it."""

from __future__ import annotations

import ast
import collections
import importlib.util
import os
from pathlib import Path

import pytest
from helpers import NEEDS_SGLANG

from sglang_helix.srt import hook_table
from sglang_helix.srt.cpu.fixes import CPU_FIXES
from sglang_helix.srt.hooks import HOOK_KINDS

ROOT = Path(__file__).resolve().parents[2]
CPU = {"SGLANG_USE_CPU_ENGINE": "1"}
DOC = ROOT / "docs" / "sglang-integration.md"
DOC_START, DOC_END = "<!-- hook-table:start -->", "<!-- hook-table:end -->"


def test_every_target_appears_once():
    counts = collections.Counter(row.target for row in hook_table.TABLE)
    assert [t for t, n in counts.items() if n > 1] == []
    assert len(hook_table.TABLE) == 80


@NEEDS_SGLANG
def test_every_rows_function_exists():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # owners import SGLang's CPU memory pools
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    for row in hook_table.TABLE:
        assert callable(row.function), f"{row.owner}.{row.fn}"


def test_cpu_rows_belong_to_registered_fixes_and_every_fix_has_rows():
    for fix in CPU_FIXES:
        rows = hook_table.rows_of_fix(fix.name)
        assert rows, fix.name
        assert {r.owner for r in rows if r.cpu_only} <= {f"cpu.{fix.module}"}, fix.name
        assert importlib.util.find_spec(f"sglang_helix.srt.cpu.{fix.module}") is not None
    for row in hook_table.TABLE:
        if row.owner.startswith("cpu."):
            assert row.cpu_fix is not None, row.target


@pytest.mark.parametrize("fix", CPU_FIXES, ids=lambda f: f.name)
def test_cpu_rows_installed_on_the_cpu_engine_only_unless_opted_out(fix):
    only_cpu = {r for r in hook_table.rows_of_fix(fix.name) if r.cpu_only}
    always = set(hook_table.installed_rows(False, {}))
    assert not only_cpu & always
    assert only_cpu <= set(hook_table.installed_rows(True, CPU))
    assert not only_cpu & set(hook_table.installed_rows(False, CPU))  # register() saw no CPU engine
    assert always <= set(hook_table.installed_rows(True, CPU))
    if fix.opt_out_env:
        assert not only_cpu & set(hook_table.installed_rows(True, {**CPU, fix.opt_out_env: "0"}))
        assert fix.enabled(CPU) and not fix.enabled({**CPU, fix.opt_out_env: "0"})
    assert not fix.enabled({}) and not fix.enabled({"SGLANG_USE_CPU_ENGINE": "0"})


def test_shared_targets_are_one_row_owned_by_helix():
    """The targets Helix and a CPU fix both need: one row, the Helix hook's, always installed."""
    shared = {r.target.rsplit(".", 1)[1]: r for r in hook_table.TABLE if r.cpu_fix and not r.cpu_only
              and not r.owner.startswith("cpu.")}
    assert {name: (r.owner, r.cpu_fix) for name, r in shared.items()} == {
        "configure": ("memory.hooks", "fp8-kv"),
        "_handle_eagle_family": ("spec", "eagle"),
        "create_draft_extend_backend": ("spec", "eagle"),
        "create_decode_backend": ("spec", "eagle")}


def test_replace_rows_say_why_they_cannot_wrap():
    replace = [r for r in hook_table.TABLE if r.kind == "REPLACE"]
    assert replace and all(r.cpu_only and "REPLACE:" in r.why for r in replace)


def test_srt_cpu_imports_nothing_of_helix():
    """srt/cpu holds CPU-engine fixes that apply with Helix on or off: it imports only itself (and
    the core's error base and spec_tree: SGLang's draft-tree page layout, pure index math), never
    srt.state, srt.memory, srt.backends, srt.spec, ..."""
    bad = {}
    for path in (ROOT / "sglang_helix" / "srt" / "cpu").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module not in ("errors", "spec_tree"):
                bad.setdefault(path.name, []).append("." * node.level + (node.module or ""))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang_helix.srt") \
                    and not node.module.startswith("sglang_helix.srt.cpu"):
                bad.setdefault(path.name, []).append(node.module)
    assert bad == {}


def test_docs_list_the_table_as_generated():
    """docs/sglang-integration.md holds `python -m sglang_helix.srt.hook_table` verbatim."""
    text = DOC.read_text()
    block = text[text.index(DOC_START) + len(DOC_START):text.index(DOC_END)].strip("\n") + "\n"
    assert block == hook_table.markdown(), "regenerate: python -m sglang_helix.srt.hook_table"
    for row in hook_table.TABLE:
        assert f"`{row.target}`" in block


@NEEDS_SGLANG
def test_table_installs_and_every_row_is_live(sglang_checks):
    """One fresh interpreter, CPU engine: register() installs every row once (again: still once);
    before SGLang's apply_hooks() the HookRegistry rows are reported missing and verify_hooks_live()
    names them; after it every row is live, both liveness checks pass, and SGLang warns about no
    hook (no target hooked twice: no "Multiple AROUND hooks")."""
    facts = sglang_checks.facts
    assert facts["installed"] == [row.target for row in hook_table.installed_rows(True, CPU)]
    assert len(facts["installed"]) == len(hook_table.TABLE)
    assert set(facts["registered_times"].values()) == {1}
    hook_rows = [f"{r.kind} {r.target}" for r in hook_table.TABLE if r.kind in HOOK_KINDS]
    assert facts["missing_before_apply"] == hook_rows
    assert "ServerArgs.add_cli_args" in facts["verify_before_apply"]
    assert "prepare_server_args" in facts["verify_before_apply"]
    assert facts["missing_after_apply"] == []
    assert facts["verify"] == facts["verify_pd"] == "ok"
    assert facts["apply_warnings"] == []
