"""Installing one seam into SGLang and asking whether it is live (the machinery of srt.hook_table).

Three kinds of seam, each with its own registry in SGLang:
- HookRegistry hooks (BEFORE / AFTER / AROUND / REPLACE on a dotted target): registered with
  SGLang's process-global HookRegistry and applied by its `apply_hooks()` (which `load_plugins()`
  runs after every plugin's `register()`). SGLang only logs a hook it failed to apply, so
  liveness walks the wrapper chain of the live attribute for our function;
- RESOLUTION: a wrapper of one named step of SGLang's argument resolution
  (`arg_groups.resolution_hooks`); the target is the step's function, its name the step;
- BACKEND: an entry of SGLang's attention-backend registry (target `...ATTENTION_BACKENDS.<name>`)
  and the matching `--attention-backend` choice.
Every install is idempotent.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from typing import Any

from ..errors import HelixError

_MAX_WRAPPER_DEPTH = 32  # HookRegistry nests one wrapper per hook; never loop on a cycle
HOOK_KINDS = ("BEFORE", "AFTER", "AROUND", "REPLACE")
SEAM_KINDS = HOOK_KINDS + ("RESOLUTION", "BACKEND")
BACKEND_REGISTRY = "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS"


class HelixHookError(HelixError):
    """A Helix hook is not live in this process (SGLang only logged why)."""


def install(kind: str, target: str, fn: Callable) -> None:
    """Register `fn` at `target` as a seam of `kind` unless it already is."""
    if kind in HOOK_KINDS:
        _register_hook(kind, target, fn)
    elif kind == "RESOLUTION":
        _register_resolution(target, fn)
    elif kind == "BACKEND":
        _register_backend(target, fn)
    else:
        raise ValueError(f"seam kind {kind!r} not in {SEAM_KINDS}")


def is_live(kind: str, target: str, fn: Callable) -> bool:
    """True if SGLang runs `fn` at `target` in this process (hooks: only after apply_hooks())."""
    if kind in HOOK_KINDS:
        return target_wraps(target, fn)
    if kind == "RESOLUTION":
        from sglang.srt.arg_groups import resolution_hooks

        return fn in resolution_hooks._HOOKS.get(_step(target), ())
    if kind == "BACKEND":
        registry, name = _backend_name(target)
        return pkgutil.resolve_name(registry).get(name) is fn
    raise ValueError(f"seam kind {kind!r} not in {SEAM_KINDS}")


def _register_hook(kind: str, target: str, fn: Callable) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not any(h is fn for _, h, _ in HookRegistry._hooks.get(target, ())):
        HookRegistry.register(target, fn, HookType[kind])


def _step(target: str) -> str:
    return target.rsplit(".", 1)[1]


def _register_resolution(target: str, fn: Callable) -> None:
    from sglang.srt.arg_groups.resolution_hooks import _HOOKS, register_resolution_hook

    if fn not in _HOOKS.get(_step(target), ()):
        register_resolution_hook(_step(target))(fn)


def _backend_name(target: str) -> tuple[str, str]:
    registry, name = target.rsplit(".", 1)
    if registry != BACKEND_REGISTRY:
        raise ValueError(f"backend seam {target!r} is not an entry of {BACKEND_REGISTRY}")
    return registry, name


def _register_backend(target: str, fn: Callable) -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    _, name = _backend_name(target)
    register_attention_backend(name)(fn)
    if name not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([name])


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
