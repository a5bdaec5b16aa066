"""One fresh SGLang interpreter for every hook check of the suite (run by the `sglang_checks` fixture).

SGLang's HookRegistry is process-global and its hooks cannot be un-applied, so the checks that
need SGLang's real targets hooked run here, once, instead of one interpreter per module: the
plugin's `register()` installs the whole hook table on the CPU engine (stdin: JSON {"checks":
{name: python source}}), the facts about the table are recorded before and after SGLang's
`apply_hooks()`, then every check runs (in name order, each in its own namespace; a check that
changes SGLang's state puts it back). Prints one line: RESULT <json>.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

# Before any SGLang import: SGLang caches is_cpu() at import time.
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ.pop("SGLANG_HELIX", None)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _verify(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test, which asserts on it
        return f"{type(exc).__name__}: {exc}"


def main() -> None:
    checks = json.loads(sys.stdin.read())["checks"]
    from sglang_helix.srt import hook_table, hooks, plugin

    plugin.register()
    rows = hook_table.installed_rows(True)
    hook_table.install(rows)  # again: idempotent
    from sglang.srt.plugins.hook_registry import HookRegistry

    out = {
        "installed": [row.target for row in rows],
        "registered_times": {row.target: [h for _, h, _ in HookRegistry._hooks.get(row.target, ())].count(
            row.function) for row in rows if row.kind in hooks.HOOK_KINDS},
        "missing_before_apply": hook_table.missing(rows),
        "verify_before_apply": _verify(plugin.verify_hooks_live),
    }
    warnings = _Warnings()
    logging.getLogger("sglang.srt.plugins.hook_registry").addHandler(warnings)
    HookRegistry.apply_hooks()
    out.update(missing_after_apply=hook_table.missing(rows), apply_warnings=warnings.lines,
               verify=_verify(plugin.verify_hooks_live), verify_pd=_verify(plugin.verify_pd_hooks_live))
    results = {}
    for name in sorted(checks):
        try:
            exec(compile(checks[name], name, "exec"), {"__name__": "__check__"})  # noqa: S102
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - a check's failure is its test's failure
            results[name] = traceback.format_exc()
    out["checks"] = results
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
