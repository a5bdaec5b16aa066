"""Helix hooks on SGLang: one `HookSpec` type, registration with SGLang's HookRegistry, liveness.

SGLang's `apply_hooks()` only logs a hook it failed to apply, so every module that hooks SGLang
keeps a tuple of HookSpecs and the plugin asks `missing_hooks` whether the live attribute really
wraps each hook before it serves with Helix.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import HelixError

_MAX_WRAPPER_DEPTH = 32  # HookRegistry nests one wrapper per hook; never loop on a cycle
KINDS = ("BEFORE", "AFTER", "AROUND", "REPLACE")


class HelixHookError(HelixError):
    """A Helix hook is not live in this process (SGLang only logged why)."""


@dataclass(frozen=True)
class HookSpec:
    """One hook: SGLang's dotted `target`, HookRegistry `kind` and our function `fn`."""

    target: str
    kind: str
    fn: Callable

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"hook kind {self.kind!r} not in {KINDS}")


def register_once(spec: HookSpec) -> None:
    """HookRegistry.register(target, fn, kind) unless this fn is already registered there."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not any(h is spec.fn for _, h, _ in HookRegistry._hooks.get(spec.target, ())):
        HookRegistry.register(spec.target, spec.fn, HookType[spec.kind])


def install(specs: Iterable[HookSpec]) -> None:
    """Register every spec (idempotent)."""
    for spec in specs:
        register_once(spec)


def missing_hooks(specs: Iterable[HookSpec]) -> list[str]:
    """Targets whose live attribute does not wrap its hook yet ([] once apply_hooks() ran)."""
    return [spec.target for spec in specs if not target_wraps(spec.target, spec.fn)]


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


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # empty cell
        return None
