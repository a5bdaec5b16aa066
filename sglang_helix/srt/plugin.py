"""SGLang plugin entry point (`sglang.srt.plugins`: helix = "sglang_helix.srt.plugin:register").

What `register()` does (SGLang calls it from `load_plugins()` in every process it starts):

1. AFTER hook on `ServerArgs.add_cli_args`: adds the "Helix" argument group (`--enable-helix`,
   `--helix-kvp-size`, ... see rules.flags), so the flags parse and show in `--help`.
2. AROUND hook on `prepare_server_args`: when the command line (or a `--config` YAML, or
   SGLANG_HELIX) mentions Helix, parses the Helix flags with SGLang's own parser and stores a
   `HelixServerArgs` as `server_args._helix_args` (ServerArgs pickles its __dict__, so the
   attribute reaches the scheduler ranks). Without Helix flags nothing is stored.
3. Resolution hooks (srt.resolution): flag rules early, model-dependent rules late; the late one
   stores the HelixConfig on ServerArgs (srt.state) and declares the "helix" attention backend.
4. Serving hooks, all passing through unless a ServerArgs carries a HelixConfig: state (KVP
   groups), memory (pool + colored allocator), models (TPA-sharded GQA, DeepSeek MLA), the
   "helix" backend, /server_info (srt.info), PD relayout (srt.pd), and on the CPU engine the
   CPU fixes (srt.cpu).
5. With SGLANG_USE_CPU_ENGINE=1 and no `sgl_kernel` module at all, the import-only stand-in
   (srt.cpu.sgl_kernel_stub) is put on `sys.path` so the CPU engine imports.

`sglang.Engine(...)` users request Helix through the environment with the CLI's flags:

    SGLANG_HELIX="--enable-helix --helix-kvp-size 2" python my_script.py

(on the CLI path SGLANG_HELIX is prepended to argv, so explicit flags win).

Without `--enable-helix` / SGLANG_HELIX the plugin changes no SGLang behaviour. Hook failures
never raise for non-Helix users; when Helix is requested, `verify_hooks_live()` raises
`HelixHookError` naming any hook SGLang failed to apply (HookRegistry only logs such failures).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..rules.argv import add_helix_group, helix_args_from_namespace
from ..rules.flags import ENV_VAR, HelixServerArgs
from . import hooks, resolution, state
from .cpu import eagle_fix, fp8_fix, fp8_kv_fix, mla_fix, moe_fix, pd_fix, sgl_kernel_stub, spec_fix, threads_fix
from .hooks import HelixHookError, HookSpec, wraps_hook
from .pd import PD_HOOKS

# Modules that subclass SGLang's pools / backends (memory, backends, models, info) are imported
# inside functions: on the CPU engine SGLang's memory_pool imports sgl_kernel, so they may load
# only after register() put the sgl_kernel stand-in in place.

logger = logging.getLogger(__name__)

ADD_CLI_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
PREPARE_TARGET = "sglang.srt.server_args.prepare_server_args"
SUPPORTED_SGLANG = ">=0.5.23,<0.5.24"

_registered = False
# Whether register() installed the CPU-engine hook tables. Liveness is checked against what was
# installed: the early validation may set SGLANG_USE_CPU_ENGINE for the child processes later.
_cpu_engine_hooks: bool | None = None


def _cli_hooks() -> tuple[HookSpec, ...]:
    return (HookSpec(ADD_CLI_ARGS_TARGET, "AFTER", _after_add_cli_args),
            HookSpec(PREPARE_TARGET, "AROUND", _around_prepare_server_args))


def serving_hooks(cpu_engine: bool) -> tuple[tuple[str, tuple[HookSpec, ...]], ...]:
    """(name, specs) of every serving hook table; the CPU fixes only on the CPU engine."""
    from . import info, spec
    from .memory.hooks import POOL_HOOKS
    from .models.deepseek import MLA_HOOKS
    from .models.gqa import GQA_HOOKS

    tables = (("state (initialize_model_parallel)", state.STATE_HOOKS),
              ("KV pool / allocator / capacity", POOL_HOOKS),
              ("GQA attention layers", GQA_HOOKS),
              ("DeepSeek MLA layers", MLA_HOOKS),
              ("/server_info", info.INFO_HOOKS),
              ("speculative drafts (NGRAM chains, NEXTN draft backend)", spec.SPEC_HOOKS))
    if cpu_engine and mla_fix.cpu_mla_fix_wanted():
        tables += (("CPU absorbed-MLA fix", mla_fix.CPU_MLA_HOOKS),)
    if cpu_engine and threads_fix.cpu_threads_fix_wanted():
        tables += (("CPU torch threads per rank", threads_fix.CPU_THREADS_HOOKS),)
    if cpu_engine and moe_fix.cpu_moe_fix_wanted():
        tables += (("CPU native-MoE fix (EP -1 ids, empty batch)", moe_fix.CPU_MOE_HOOKS),)
    if cpu_engine:
        tables += (("CPU fp8 torch path", fp8_fix.CPU_FP8_HOOKS),
                   ("CPU fp8 KV, Helix off", fp8_kv_fix.CPU_FP8_KV_HOOKS),
                   ("CPU speculative decoding ops (NGRAM)", spec_fix.CPU_SPEC_HOOKS),
                   ("CPU EAGLE / NEXTN draft ops", eagle_fix.CPU_EAGLE_HOOKS))
    return tables


def pd_hooks(cpu_engine: bool) -> tuple[HookSpec, ...]:
    """The PD relayout hooks, plus the CPU engine's PD fixes there."""
    return PD_HOOKS + (pd_fix.CPU_PD_HOOKS if cpu_engine else ())


# ---------------------------------------------------------------- registration


def register() -> None:
    """Entry point for `sglang.srt.plugins`; idempotent."""
    global _registered, _cpu_engine_hooks
    if _registered:
        return
    _install_cpu_stub()
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    hooks.install(_cli_hooks())
    for step, hook in RESOLUTION_HOOKS:
        register_resolution_hook(step)(hook)
    cpu_engine = _cpu_engine_hooks = sgl_kernel_stub.cpu_engine_requested()
    for _, specs in serving_hooks(cpu_engine):
        hooks.install(specs)
    hooks.install(pd_hooks(cpu_engine))
    from .backends.factory import register_helix_backend

    register_helix_backend()
    _registered = True


def _install_cpu_stub() -> None:
    try:
        sgl_kernel_stub.install()
    except OSError as exc:  # never break SGLang start-up over the stand-in
        logger.warning("sglang_helix: could not install the sgl_kernel CPU stand-in: %s", exc)


# ---------------------------------------------------------------- liveness


def verify_hooks_live() -> None:
    """Raise HelixHookError naming every Helix hook that is not applied in this process."""
    missing = [name for name, is_live in _liveness_checks() if not is_live()]
    if missing:
        raise HelixHookError(
            f"sglang_helix: hook(s) not live: {', '.join(missing)}. SGLang logs why at start-up "
            "('Failed to apply hooks to ...'). Check that the plugin is installed "
            "(entry point sglang.srt.plugins: helix), that SGLANG_PLUGINS (if set) includes "
            f"'helix', and that sglang is {SUPPORTED_SGLANG} (hook targets are internal paths)."
        )


def cpu_engine_hooks() -> bool:
    """True if this process's hook tables include the CPU-engine ones (register()'s view; the
    environment's when register() has not run)."""
    return sgl_kernel_stub.cpu_engine_requested() if _cpu_engine_hooks is None else _cpu_engine_hooks


def verify_pd_hooks_live() -> None:
    """A Helix decode server needs the relayout hooks live (SGLang only logs apply failures)."""
    missing = hooks.missing_hooks(pd_hooks(cpu_engine_hooks()))
    if missing:
        raise HelixHookError(f"sglang_helix: PD hook(s) not live: {', '.join(missing)}; SGLang "
                             f"logs why at start-up; sglang must be {SUPPORTED_SGLANG}")


# The resolution hooks, bound to the liveness checks they run (identity matters for liveness).
RESOLUTION_HOOKS = (
    (resolution.EARLY_STEP, functools.partial(resolution.early_validation, verify_hooks=verify_hooks_live)),
    (resolution.LATE_STEP, functools.partial(resolution.late_validation, verify_pd_hooks=verify_pd_hooks_live)),
)


def _liveness_checks() -> list[tuple[str, Callable[[], bool]]]:
    checks = [
        (f"AFTER {ADD_CLI_ARGS_TARGET}", _add_cli_args_live),
        (f"AROUND {PREPARE_TARGET}", _prepare_live),
        *((f"resolution hook {step}", lambda s=step, h=hook: resolution.resolution_hook_live(s, h))
          for step, hook in RESOLUTION_HOOKS),
        ('attention backend "helix" in ATTENTION_BACKENDS', _backend_live),
    ]
    for name, specs in serving_hooks(cpu_engine_hooks()):
        checks.append((f"{name} hooks", lambda s=specs: not hooks.missing_hooks(s)))
    checks.append(("state hook (bootstrap binding)", lambda: not state.state_hooks_missing()))
    return checks


def _backend_live() -> bool:
    from .backends.factory import backend_live

    return backend_live()


def _add_cli_args_live() -> bool:
    from sglang.srt.server_args import ServerArgs

    return wraps_hook(ServerArgs.add_cli_args, _after_add_cli_args)


def _prepare_live() -> bool:
    import sglang.srt.server_args as server_args_module

    live = server_args_module.prepare_server_args
    if not wraps_hook(live, _around_prepare_server_args):
        return False
    original = _innermost(live)
    return not any(  # no module kept a stale `from ... import prepare_server_args` binding
        _module_vars(module).get("prepare_server_args") is original
        for module in list(sys.modules.values())
    )


def _module_vars(module: Any) -> dict:
    try:
        return vars(module)
    except TypeError:
        return {}


def _innermost(fn: Any) -> Any:
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


# ---------------------------------------------------------------- CLI hooks


def _after_add_cli_args(
    result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any
) -> None:
    try:
        add_helix_group(parser)
    except argparse.ArgumentError as exc:  # another plugin owns a flag name; keep SGLang alive
        logger.warning("sglang_helix: could not add the Helix flags: %s", exc)


def _around_prepare_server_args(
    original: Callable, argv: Sequence[str], *args: Any, **kwargs: Any
) -> Any:
    server_args = original(argv, *args, **kwargs)
    helix = helix_args_from_cli(list(argv), os.environ.get(ENV_VAR))
    if helix is not None and helix.enable_helix:
        verify_hooks_live()
        setattr(server_args, state.ARGS_ATTR, helix)
    return server_args


def helix_args_from_cli(argv: list[str], env_value: str | None) -> HelixServerArgs | None:
    """Helix flags from argv (+ --config YAML, + SGLANG_HELIX prepended); None if none given."""
    if "--config" in argv:
        argv = _merge_config(argv)
    env_argv = shlex.split(env_value) if env_value else []
    if not env_argv and not any("helix" in item for item in argv):
        return None
    if not _add_cli_args_live():
        verify_hooks_live()
    namespace, _ = _full_parser().parse_known_args(env_argv + argv)
    return helix_args_from_namespace(namespace)


def _full_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return parser


def _merge_config(argv: list[str]) -> list[str]:
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    return ConfigArgumentMerger(_full_parser()).merge_config_with_args(argv)


