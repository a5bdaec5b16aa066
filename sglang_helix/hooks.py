"""Registering Helix hooks with SGLang's HookRegistry, and checking that they are live.

SGLang's `apply_hooks()` only logs a hook it failed to apply, so every Helix module keeps its
(target, hook) table and asks `missing_hooks` whether the live attribute really wraps each hook.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

_MAX_WRAPPER_DEPTH = 32  # HookRegistry nests one wrapper per hook; never loop on a cycle


def register_once(target: str, hook: Callable, kind: str) -> None:
    """HookRegistry.register(target, hook, HookType[kind]) unless already registered."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, ())):
        HookRegistry.register(target, hook, HookType[kind])


def wraps_hook(fn: Any, hook: Callable) -> bool:
    """True if `hook` is closed over by `fn` or by any function it wraps (HookRegistry wrappers)."""
    fn = getattr(fn, "__func__", fn)  # staticmethod / bound method
    for _ in range(_MAX_WRAPPER_DEPTH):
        if fn is None:
            return False
        if any(_cell_value(cell) is hook for cell in getattr(fn, "__closure__", None) or ()):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def target_wraps(target: str, hook: Callable) -> bool:
    """True if the live attribute at dotted path `target` wraps `hook`."""
    owner, name = target.rsplit(".", 1)
    return wraps_hook(getattr(pkgutil.resolve_name(owner), name, None), hook)


def missing_hooks(table: Iterable[tuple[str, Callable]]) -> list[str]:
    """Targets of (target, hook) pairs whose live attribute does not wrap the hook yet."""
    return [target for target, hook in table if not target_wraps(target, hook)]


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # empty cell
        return None
