"""SGLang plugin entry point (`sglang.srt.plugins`: helix = "sglang_helix.plugin:register").

What `register()` does (SGLang calls it from `load_plugins()` in every process it starts):

1. AFTER hook on `sglang.srt.server_args.ServerArgs.add_cli_args`: adds the "Helix" argument
   group (`--enable-helix`, `--helix-kvp-size`, ... see `sglang_helix.args`), so the flags parse
   and show in `python -m sglang.launch_server --help` / `sglang serve --help`.
2. AROUND hook on `sglang.srt.server_args.prepare_server_args`: when the command line (or a
   `--config` YAML, or SGLANG_HELIX) mentions Helix, parses the Helix flags with SGLang's own
   parser and stores a `HelixServerArgs` as `server_args._helix_args`. ServerArgs is a msgspec
   Struct with `dict=True` whose `__reduce__` carries `__dict__`, so the attribute reaches the
   scheduler ranks. Without Helix flags nothing is stored.
3. Resolution hooks (`sglang.srt.arg_groups.resolution_hooks.register_resolution_hook`), both
   wrapping the built-in step and running it first:
   - `validate_prefill_cp_platform` (early; before model-path resolution, downloads and the dummy
     model short-cut): flag-only refusals, hook liveness, CPU multi-rank env.
   - `handle_other_validations` (late; attention backend, speculative settings and page size are
     resolved, the HF config is loaded but no weights): model-dependent refusals (page size 1,
     HiCache, PD, architectures without a model hook), stores the HelixConfig as
     `server_args._helix_layout`, declares `prefill/decode_attention_backend = "helix"` and logs
     the resolved layout once.
4. Serving hooks: the Helix KV pool + colored allocator (`sglang_pool.install_pool_hooks`), the
   KVP groups and the TPA-sharded attention layers (`sglang_model.install_model_hooks`), the
   "helix" attention backend (`sglang_backend.register_helix_backend`), Helix state in
   /server_info (AFTER hook on the scheduler's internal-state `_add_memory_usage`), and the MLA
   side (`sglang_mla.install_mla_hooks`, `install_cpu_absorbed_mla` on the CPU engine) when that
   module is installed.
5. With SGLANG_USE_CPU_ENGINE=1 and no `sgl_kernel` module at all, the import-only stand-in
   (`sglang_helix.sgl_kernel_cpu_stub`) is put on `sys.path` so the CPU engine imports.

`sglang.Engine(...)` users: ServerArgs rejects unknown keyword arguments, so Helix is requested
through the environment with the same flags as the CLI:

    SGLANG_HELIX="--enable-helix --helix-kvp-size 2" python my_script.py

(on the CLI path SGLANG_HELIX is prepended to argv, so explicit flags win).

Without `--enable-helix` / SGLANG_HELIX the plugin changes no SGLang behaviour: the hooks pass
through, nothing is stored or validated. Hook failures never raise for non-Helix users; when Helix
is requested, `verify_hooks_live()` raises `HelixHookError` naming any hook SGLang failed to apply
(SGLang's HookRegistry only logs such failures).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import sgl_kernel_cpu_stub
from .args import (
    ENV_VAR,
    HelixServerArgs,
    ModelInfo,
    ServerLayout,
    add_helix_group,
    check_server_compat,
    describe,
    helix_args_from_namespace,
    parse_helix_env,
    resolve_helix_args,
)
from .config import HelixConfigError
from .hooks import wraps_hook
from .cpu_env import apply_cpu_env

logger = logging.getLogger(__name__)

ADD_CLI_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
PREPARE_TARGET = "sglang.srt.server_args.prepare_server_args"
EARLY_STEP = "validate_prefill_cp_platform"
LATE_STEP = "handle_other_validations"
HELIX_ATTR = "_helix_args"
LAYOUT_ATTR = "_helix_layout"
SUPPORTED_SGLANG = ">=0.5.23,<0.5.24"

_registered = False


class HelixHookError(RuntimeError):
    """A Helix hook is not live in this process (SGLang only logged why)."""


INTERNAL_STATE_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                         "SchedulerInternalStateController._add_memory_usage")
SERVER_INFO_KEY = "helix"


# ---------------------------------------------------------------- registration


def register() -> None:
    """Entry point for `sglang.srt.plugins`; idempotent."""
    global _registered
    if _registered:
        return
    _install_cpu_stub()
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(ADD_CLI_ARGS_TARGET, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(PREPARE_TARGET, _around_prepare_server_args, HookType.AROUND)
    register_resolution_hook(EARLY_STEP)(_early_validation)
    register_resolution_hook(LATE_STEP)(_late_validation)
    _register_serving_hooks(HookRegistry, HookType)
    _registered = True


def _register_serving_hooks(registry: Any, hook_type: Any) -> None:
    """Pool, model, backend, server-info and (if installed) MLA hooks; all pass through
    unless a ServerArgs carries `_helix_layout`."""
    from .sglang_backend import register_helix_backend
    from .sglang_mla import install_cpu_absorbed_mla, install_mla_hooks
    from .sglang_model import install_model_hooks
    from .sglang_pd import install_pd_hooks
    from .sglang_pool import install_pool_hooks

    install_pool_hooks()
    install_model_hooks()
    register_helix_backend()
    registry.register(INTERNAL_STATE_TARGET, _after_add_memory_usage, hook_type.AFTER)
    install_mla_hooks()
    cpu_engine = sgl_kernel_cpu_stub.cpu_engine_requested()
    if cpu_engine:
        install_cpu_absorbed_mla()
    install_pd_hooks(cpu_engine)


def _install_cpu_stub() -> None:
    try:
        sgl_kernel_cpu_stub.install()
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


def _liveness_checks() -> list[tuple[str, Callable[[], bool]]]:
    return [
        (f"AFTER {ADD_CLI_ARGS_TARGET}", _add_cli_args_live),
        (f"AROUND {PREPARE_TARGET}", _prepare_live),
        (f"resolution hook {EARLY_STEP}",
         lambda: _resolution_hook_live(EARLY_STEP, _early_validation)),
        (f"resolution hook {LATE_STEP}",
         lambda: _resolution_hook_live(LATE_STEP, _late_validation)),
        ("AROUND KVCacheConfigurator pool/allocator/capacity hooks", _pool_hooks_live),
        ("model hooks (initialize_model_parallel, Llama/Qwen2/Qwen3 attention __init__)",
         _model_hooks_live),
        ("MLA model hooks (DeepseekV2AttentionMLA)", _mla_hooks_live),
        ('attention backend "helix" in ATTENTION_BACKENDS', _backend_live),
        (f"AFTER {INTERNAL_STATE_TARGET}", _server_info_live),
    ]


def _pool_hooks_live() -> bool:
    from .sglang_pool import pool_hooks_live

    return not pool_hooks_live()


def _model_hooks_live() -> bool:
    from .sglang_model import model_hooks_live

    return not model_hooks_live()


def _mla_hooks_live() -> bool:
    from .sglang_mla import cpu_absorbed_mla_live, mla_hooks_live

    cpu_fix_ok = not sgl_kernel_cpu_stub.cpu_engine_requested() or cpu_absorbed_mla_live()
    return not mla_hooks_live() and cpu_fix_ok


def _backend_live() -> bool:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from .sglang_backend import BACKEND_NAME, create_helix_backend

    return ATTENTION_BACKENDS.get(BACKEND_NAME) is create_helix_backend


def _server_info_live() -> bool:
    import pkgutil

    owner, name = INTERNAL_STATE_TARGET.rsplit(".", 1)
    return wraps_hook(getattr(pkgutil.resolve_name(owner), name), _after_add_memory_usage)


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


def _resolution_hook_live(step: str, hook: Callable) -> bool:
    from sglang.srt.arg_groups import resolution_hooks

    return hook in resolution_hooks._HOOKS.get(step, ())


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
        setattr(server_args, HELIX_ATTR, helix)
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


# ---------------------------------------------------------------- resolution hooks


def helix_args_of(server_args: Any) -> HelixServerArgs | None:
    """The Helix request of a ServerArgs: CLI attribute first, else SGLANG_HELIX."""
    stored = getattr(server_args, HELIX_ATTR, None)
    if stored is not None:
        return stored
    return parse_helix_env(os.environ.get(ENV_VAR))


def _early_validation(server_args: Any, previous: Callable[[Any], None]) -> None:
    previous(server_args)
    helix = helix_args_of(server_args)
    if helix is None or not helix.enable_helix:
        return
    verify_hooks_live()
    from sglang.srt.arg_groups.overrides import resolving_view

    cfg = resolving_view(server_args)
    check_server_compat(helix, ServerLayout.of(cfg))
    if str(cfg.model_path).lower() in ("none", "dummy"):
        raise HelixConfigError(
            "Helix: --enable-helix needs a real --model-path (its config.json gives the heads "
            "Helix shards); drop --enable-helix for a model-less server"
        )
    _apply_cpu_env_if_cpu(cfg)


def _apply_cpu_env_if_cpu(cfg: Any) -> None:
    if cfg.device == "cpu" or sgl_kernel_cpu_stub.cpu_engine_requested():
        changed = apply_cpu_env(int(cfg.tp_size) * int(cfg.pp_size) * int(cfg.dp_size or 1))
        if changed:
            logger.info("sglang_helix: set CPU multi-rank environment %s", changed)


def _late_validation(server_args: Any, previous: Callable[[Any], None]) -> None:
    previous(server_args)
    helix = helix_args_of(server_args)
    if helix is None or not helix.enable_helix:
        return
    from sglang.srt.arg_groups.overrides import declare_resolution, model_config_of, resolving_view

    hf = model_config_of(server_args).hf_config.to_dict()
    model_info = ModelInfo.from_hf_config(hf)
    cfg = resolving_view(server_args)
    layout = resolve_helix_args(helix, cfg, model_info)
    check_serving_support(cfg)
    verify_pd_hooks_live(cfg)
    setattr(server_args, LAYOUT_ATTR, layout)
    # The helix backends do not implement SGLang's CUDA-graph capture hooks yet (GPU only;
    # CPU never captures), so graphs are switched off rather than captured wrongly.
    if pd_mode(cfg) == "decode" and getattr(cfg, "disaggregation_decode_retraction_backup", None) is None:
        declare_resolution(server_args, "sglang_helix", disaggregation_decode_retraction_backup="none")
    declare_resolution(server_args, "sglang_helix", prefill_attention_backend="helix",
                       decode_attention_backend="helix", disable_decode_cuda_graph=True,
                       disable_prefill_cuda_graph=True)
    logger.info("sglang_helix: Helix layout %s", describe_serving(layout, hf))


def check_serving_support(cfg: Any) -> None:
    """Refuse what validates as a layout but has no Helix serving path yet (flag + fix)."""
    if int(cfg.page_size or 1) < 2:
        raise HelixConfigError(
            f"Helix: --page-size {cfg.page_size}: the Helix allocator colors whole pages by KVP "
            "owner and SGLang's page-size-1 path allocates without positions; use --page-size 16 "
            "(or any >= 2)")
    if getattr(cfg, "enable_hierarchical_cache", False):
        raise HelixConfigError("Helix: --enable-hierarchical-cache (HiCache) copies KV by loc "
                               "across ranks' pools; drop --enable-hierarchical-cache")
    check_pd_support(cfg)
    if getattr(cfg, "enable_mixed_chunk", False):
        raise HelixConfigError("Helix: --enable-mixed-chunk mixes decode rows into extend "
                               "batches, which the helix backend plans separately; drop "
                               "--enable-mixed-chunk")


PD_BACKENDS = ("mooncake", "mooncake_tcp")


def pd_mode(cfg: Any) -> str:
    """--disaggregation-mode as a string: "null" (no PD), "prefill" or "decode"."""
    return str(getattr(cfg, "disaggregation_mode", "null") or "null")


def check_pd_support(cfg: Any) -> None:
    """Helix serves the decode side of PD over mooncake; refuse the rest with flag + fix."""
    mode = pd_mode(cfg)
    if mode == "null":
        return
    if mode == "prefill":
        raise HelixConfigError(
            "Helix: --disaggregation-mode prefill: Helix shards decode attention; start the "
            "prefill server without --enable-helix (it feeds a Helix decode server as is) and "
            "put --enable-helix on the --disaggregation-mode decode server")
    backend = str(getattr(cfg, "disaggregation_transfer_backend", "mooncake"))
    if backend not in PD_BACKENDS:
        raise HelixConfigError(
            f"Helix: --disaggregation-transfer-backend {backend}: the Helix relayout (each KVP "
            "rank receives only its pages) is implemented for mooncake; use "
            "--disaggregation-transfer-backend mooncake (or mooncake_tcp)")
    if getattr(cfg, "disaggregation_decode_enable_offload_kvcache", False):
        raise HelixConfigError("Helix: --disaggregation-decode-enable-offload-kvcache copies KV "
                               "by loc into a host pool; drop it")
    if float(getattr(cfg, "disaggregation_decode_host_receive_threshold", 1) or 1) < 1:
        raise HelixConfigError("Helix: --disaggregation-decode-host-receive-threshold < 1 "
                               "receives KV into a host pool; leave it at 1")
    backup = getattr(cfg, "disaggregation_decode_retraction_backup", None)
    if backup not in (None, "none"):
        raise HelixConfigError(
            f"Helix: --disaggregation-decode-retraction-backup {backup} copies a retracted "
            "request's KV by loc, which Helix pools (1/KVP of the pages per rank) do not "
            "support yet; use --disaggregation-decode-retraction-backup none (a retracted "
            "request gets 503 and the client retries)")


def verify_pd_hooks_live(cfg: Any) -> None:
    """A Helix decode server needs the relayout hooks live (SGLang only logs apply failures)."""
    if pd_mode(cfg) == "null":
        return
    from .sglang_pd import pd_hooks_missing

    missing = pd_hooks_missing(sgl_kernel_cpu_stub.cpu_engine_requested())
    if missing:
        raise HelixHookError(f"sglang_helix: PD hook(s) not live: {', '.join(missing)}; SGLang "
                             f"logs why at start-up; sglang must be {SUPPORTED_SGLANG}")


def describe_serving(layout: Any, hf: dict) -> str:
    """The layout line logged once: N, KVP, TPA, FFN TP/EP, page size, backend."""
    n = layout.world_size
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or 0
    ffn = f"MoE TP x EP = {n} ({int(experts)} experts)" if experts else f"dense TP = {n}"
    return (f"{describe(layout)}; N={n} = KVP {layout.kvp} x TPA {layout.tpa}; FFN {ffn}; "
            f"page_size={layout.page_size}; attention backend helix (prefill + decode)")


def _after_add_memory_usage(result: Any, controller: Any, state: dict, *args: Any, **kwargs: Any) -> None:
    """Adds state["helix"] (layout + per-KVP-rank KV usage) to /server_info's internal_states."""
    allocator = getattr(getattr(controller, "scheduler", None), "token_to_kv_pool_allocator", None)
    from .sglang_pd import SERVER_INFO_KEY as PD_KEY, pd_transfer_state
    from .sglang_pool import helix_kv_state

    info = helix_kv_state(allocator)
    if info is not None:
        state[SERVER_INFO_KEY] = info
    transfers = pd_transfer_state()
    if transfers is not None:
        state[PD_KEY] = transfers
    return None
