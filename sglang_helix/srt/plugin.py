"""SGLang plugin entry point (`sglang.srt.plugins`: helix = "sglang_helix.srt.plugin:register").

`register()` (SGLang calls it from `load_plugins()` in every process it starts, then applies the
registered hooks):

1. Checks SGLang's version (srt.sglang_version). Outside the supported range it installs nothing,
   logs one warning, and refuses a launch that asks for Helix, naming the supported version.
2. With SGLANG_USE_CPU_ENGINE=1 and no `sgl_kernel` module at all, puts the import-only stand-in
   (srt.cpu.sgl_kernel_stub) on `sys.path` so the CPU engine imports.
3. Installs the rows of the hook table (srt.hook_table, every seam into SGLang in one place) this
   process needs: the CLI hooks below, the two argument-resolution steps (srt.resolution), the
   "helix" attention backend, the serving hooks (state, memory, models, /server_info,
   speculative decoding, PD), and on the CPU engine the CPU fixes (srt.cpu.fixes).

What changes without `--enable-helix` / SGLANG_HELIX: the Helix flags exist, "helix" is an
`--attention-backend` choice, and on SGLang's CPU engine the CPU fixes apply (absorbed MLA on
torch_native, per-rank torch threads, native MoE with EP and empty batches, fp8 checkpoints and
fp8 KV without AMX, NGRAM and NEXTN speculative decoding, PD host paths; each fix's opt-out is
in srt.cpu.fixes). Every other hook calls straight through: off the CPU engine SGLang serves
exactly as without the plugin. Hook failures never raise for non-Helix users; when Helix is
requested, `verify_hooks_live()` raises `HelixHookError` naming any seam SGLang failed to apply
(HookRegistry only logs such failures).

The CLI hooks: an AFTER hook on `ServerArgs.add_cli_args` adds the "Helix" argument group
(`--enable-helix`, `--helix-kvp-size`, ... see rules.flags); an AROUND hook on `prepare_server_args`,
when the command line (or a `--config` YAML, or SGLANG_HELIX) mentions Helix, parses the Helix
flags with SGLang's own parser and stores a `HelixServerArgs` as `server_args._helix_args`
(ServerArgs pickles its __dict__, so the attribute reaches the scheduler ranks).

`sglang.Engine(...)` users request Helix through the environment with the CLI's flags:

    SGLANG_HELIX="--enable-helix --helix-kvp-size 2" python my_script.py

(on the CLI path SGLANG_HELIX is prepended to argv, so explicit flags win).
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
from . import hook_table, resolution, sglang_version, state
from .cpu import sgl_kernel_stub
from .hooks import HelixHookError, wraps_hook
from .sglang_version import SUPPORTED_SGLANG

# The hook table resolves owner modules only when it installs them: on the CPU engine SGLang's
# memory_pool imports sgl_kernel, so those owners load after register() put the stand-in in place.

logger = logging.getLogger(__name__)

_registered = False
# Whether register() installed the CPU-engine rows. Liveness is checked against what was
# installed: the early validation may set SGLANG_USE_CPU_ENGINE for the child processes later.
_cpu_engine_hooks: bool | None = None


# ---------------------------------------------------------------- registration


def register() -> None:
    """Entry point for `sglang.srt.plugins`; idempotent."""
    global _registered, _cpu_engine_hooks
    if _registered:
        return
    version = sglang_version.installed_sglang()
    if not sglang_version.supported(version):
        logger.warning(sglang_version.unsupported_warning(version))
        if sglang_version.helix_requested(sys.argv[1:], os.environ):
            # SystemExit: load_plugins() logs and swallows any Exception a plugin raises.
            raise SystemExit(sglang_version.helix_refusal(version))
        return
    _install_cpu_stub()
    cpu_engine = _cpu_engine_hooks = sgl_kernel_stub.cpu_engine_requested()
    hook_table.install(hook_table.installed_rows(cpu_engine))
    _registered = True


def _install_cpu_stub() -> None:
    try:
        sgl_kernel_stub.install()
    except OSError as exc:  # never break SGLang start-up over the stand-in
        logger.warning("sglang_helix: could not install the sgl_kernel CPU stand-in: %s", exc)


# ---------------------------------------------------------------- liveness


def cpu_engine_hooks() -> bool:
    """True if this process's rows include the CPU-engine ones (register()'s view; the
    environment's when register() has not run)."""
    return sgl_kernel_stub.cpu_engine_requested() if _cpu_engine_hooks is None else _cpu_engine_hooks


def _rows(pd: bool) -> tuple[hook_table.Seam, ...]:
    return tuple(row for row in hook_table.installed_rows(cpu_engine_hooks()) if (row.area == "pd") == pd)


def verify_hooks_live() -> None:
    """Raise HelixHookError naming every seam of this process (PD aside) that is not live."""
    missing = hook_table.missing(_rows(pd=False))
    if not _prepare_binding_live():
        missing.append("a stale `from ... import prepare_server_args` binding")
    if not state.bootstrap_binding_live():
        missing.append("sglang.srt.distributed.bootstrap.initialize_model_parallel (binding)")
    if missing:
        raise HelixHookError(
            f"sglang_helix: hook(s) not live: {', '.join(missing)}. SGLang logs why at start-up "
            "('Failed to apply hooks to ...'). Check that the plugin is installed "
            "(entry point sglang.srt.plugins: helix), that SGLANG_PLUGINS (if set) includes "
            f"'helix', and that sglang is {SUPPORTED_SGLANG} (hook targets are internal paths)."
        )


def verify_pd_hooks_live() -> None:
    """A Helix decode server needs the PD rows live (SGLang only logs apply failures)."""
    missing = hook_table.missing(_rows(pd=True))
    if missing:
        raise HelixHookError(f"sglang_helix: PD hook(s) not live: {', '.join(missing)}; SGLang "
                             f"logs why at start-up; sglang must be {SUPPORTED_SGLANG}")


# The resolution steps of the hook table, bound to the liveness checks they run (their identity
# is what the table installs and checks).
early_resolution = functools.partial(resolution.early_validation, verify_hooks=verify_hooks_live)
late_resolution = functools.partial(resolution.late_validation, verify_pd_hooks=verify_pd_hooks_live)
RESOLUTION_HOOKS = ((resolution.EARLY_STEP, early_resolution), (resolution.LATE_STEP, late_resolution))


def _add_cli_args_live() -> bool:
    from sglang.srt.server_args import ServerArgs

    return wraps_hook(ServerArgs.add_cli_args, _after_add_cli_args)


def _prepare_binding_live() -> bool:
    """No module kept a stale `from ... import prepare_server_args` binding to the unhooked one."""
    import sglang.srt.server_args as server_args_module

    live = server_args_module.prepare_server_args
    if not wraps_hook(live, _around_prepare_server_args):
        return True  # not applied at all: the table's row says so
    original = _innermost(live)
    return not any(_module_vars(module).get("prepare_server_args") is original
                   for module in list(sys.modules.values()))


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


