"""Launch rules for --enable-helix, run inside SGLang's argument resolution.

Two resolution hooks (sglang.srt.arg_groups.resolution_hooks), each wrapping the built-in step
and running it first:
- early (`validate_prefill_cp_platform`: before model-path resolution, downloads and the dummy
  model short-cut): flag-only refusals, hook liveness, CPU multi-rank env; without --page-size,
  declares `page_size = 64` (launch.HELIX_DEFAULT_PAGE_SIZE) before SGLang's own default (1) and
  the backends' page-size constraints resolve it, so everything after sees the Helix page size;
- late (`handle_other_validations`: attention backend, speculative settings and page size are
  resolved, the HF config is loaded but no weights): model-dependent refusals (page size 1,
  HiCache, PD, architectures without a model hook), stores the HelixConfig on ServerArgs
  (srt.state.CONFIG_ATTR), declares `prefill/decode_attention_backend = "helix"` and logs the
  resolved layout once.
Every refusal is a HelixConfigError naming the flag and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..config import HelixConfigError
from . import state
from .args import ENV_VAR, HelixServerArgs, ModelInfo, ServerLayout, check_server_compat, describe, parse_helix_env, resolve_helix_args
from .launch import (DEFAULT_PAGE_SIZE_REASON, PREFILL_GRAPH_REASON, check_chunked_prefill,
                     check_kv_cache_dtype, check_page_size, decode_graph_blocker, helix_page_size)
from .cpu.env import apply_cpu_env
from .memory.retraction import HELIX_RETRACTION_BACKUP
from .cpu.sgl_kernel_stub import cpu_engine_requested

logger = logging.getLogger(__name__)

EARLY_STEP = "validate_prefill_cp_platform"
LATE_STEP = "handle_other_validations"


def helix_args_of(server_args: Any) -> HelixServerArgs | None:
    """The Helix request of a ServerArgs: CLI attribute first, else SGLANG_HELIX."""
    stored = getattr(server_args, state.ARGS_ATTR, None)
    if stored is not None:
        return stored
    return parse_helix_env(os.environ.get(ENV_VAR))


def early_validation(server_args: Any, previous: Callable[[Any], None], *,
                     verify_hooks: Callable[[], None]) -> None:
    """Early resolution hook; verify_hooks() raises if a Helix hook is not live."""
    previous(server_args)
    helix = helix_args_of(server_args)
    if helix is None or not helix.enable_helix:
        return
    verify_hooks()
    from sglang.srt.arg_groups.overrides import resolving_view

    view = resolving_view(server_args)
    check_server_compat(helix, ServerLayout.of(view))
    if str(view.model_path).lower() in ("none", "dummy"):
        raise HelixConfigError(
            "Helix: --enable-helix needs a real --model-path (its config.json gives the heads "
            "Helix shards); drop --enable-helix for a model-less server"
        )
    declare_default_page_size(server_args, view)
    check_chunked_prefill(view.chunked_prefill_size)
    check_kv_cache_dtype(getattr(view, "kv_cache_dtype", None))
    _apply_cpu_env_if_cpu(view)


def declare_default_page_size(server_args: Any, view: Any) -> None:
    """--page-size not given (still None: SGLang resolves its default 1 later): declare Helix's
    default so every later step (backend page constraints, chunked-prefill and CUDA-graph sizes,
    the pool) sees it. An explicit --page-size, 1 included, is left alone (check_page_size)."""
    page_size = helix_page_size(view.page_size)
    if page_size is None:
        return
    from sglang.srt.arg_groups.overrides import declare_resolution

    declare_resolution(server_args, "sglang_helix", page_size=page_size)
    logger.info("sglang_helix: --page-size not given; using %d for Helix (%s)", page_size,
                DEFAULT_PAGE_SIZE_REASON)


def _apply_cpu_env_if_cpu(view: Any) -> None:
    if view.device == "cpu" or cpu_engine_requested():
        changed = apply_cpu_env(int(view.tp_size) * int(view.pp_size) * int(view.dp_size or 1))
        if changed:
            logger.info("sglang_helix: set CPU multi-rank environment %s", changed)


def late_validation(server_args: Any, previous: Callable[[Any], None], *,
                    verify_pd_hooks: Callable[[], None]) -> None:
    """Late resolution hook; verify_pd_hooks() raises if a PD hook is not live."""
    previous(server_args)
    helix = helix_args_of(server_args)
    if helix is None or not helix.enable_helix:
        return
    from sglang.srt.arg_groups.overrides import declare_resolution, model_config_of, resolving_view

    hf = model_config_of(server_args).hf_config.to_dict()
    model_info = ModelInfo.from_hf_config(hf)
    view = resolving_view(server_args)
    helix_cfg = resolve_helix_args(helix, view, model_info)
    check_serving_support(view)
    if pd_mode(view) != "null":
        verify_pd_hooks()
    setattr(server_args, state.CONFIG_ATTR, helix_cfg)
    if pd_mode(view) == "decode" and getattr(view, "disaggregation_decode_retraction_backup", None) is None:
        # SGLang would pick host_pool for an MHA pool on GPU; Helix pools back up per KVP rank
        declare_resolution(server_args, "sglang_helix",
                           disaggregation_decode_retraction_backup=HELIX_RETRACTION_BACKUP)
    declare_resolution(server_args, "sglang_helix", prefill_attention_backend="helix",
                       decode_attention_backend="helix",
                       cuda_graph_config=graph_config(helix_cfg, view))
    logger.info("sglang_helix: Helix layout %s",
                describe_serving(helix_cfg, hf, int(getattr(view, "ep_size", 1) or 1)))
    logger.info("sglang_helix: prefill chunks of at most %s tokens (--chunked-prefill-size)",
                view.chunked_prefill_size)


def graph_config(helix_cfg: Any, view: Any):
    """SGLang's resolved CudaGraphConfig with the phases Helix cannot capture set to disabled:
    prefill always (the extend path plans each chunk on the host), decode when a blocker applies
    (logged). The other settings (batch sizes, backends) stay as SGLang resolved them."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    config = with_phase(view.cuda_graph_config, Phase.PREFILL, backend=Backend.DISABLED)
    logger.info("sglang_helix: prefill CUDA graphs off: %s", PREFILL_GRAPH_REASON)
    blocker = decode_graph_blocker(helix_cfg, view.device, getattr(view, "speculative_algorithm", None))
    if blocker is not None:
        config = with_phase(config, Phase.DECODE, backend=Backend.DISABLED)
        if str(view.device) == "cuda":
            logger.info("sglang_helix: decode CUDA graphs off: %s", blocker)
    return config


def check_serving_support(view: Any) -> None:
    """Refuse what validates as a Helix layout but has no Helix serving path yet (flag + fix)."""
    check_page_size(view.page_size)
    if getattr(view, "enable_hierarchical_cache", False):
        raise HelixConfigError("Helix: --enable-hierarchical-cache (HiCache) copies KV by loc "
                               "across ranks' pools; drop --enable-hierarchical-cache")
    check_pd_support(view)
    if getattr(view, "enable_mixed_chunk", False):
        raise HelixConfigError("Helix: --enable-mixed-chunk mixes decode rows into extend "
                               "batches, which the helix backend plans separately; drop "
                               "--enable-mixed-chunk")


PD_BACKENDS = ("mooncake", "mooncake_tcp")


def pd_mode(view: Any) -> str:
    """--disaggregation-mode as a string: "null" (no PD), "prefill" or "decode"."""
    return str(getattr(view, "disaggregation_mode", "null") or "null")


def check_pd_support(view: Any) -> None:
    """Helix serves the decode side of PD over mooncake; refuse the rest with flag + fix."""
    mode = pd_mode(view)
    if mode == "null":
        return
    if mode == "prefill":
        raise HelixConfigError(
            "Helix: --disaggregation-mode prefill: Helix shards decode attention; start the "
            "prefill server without --enable-helix (it feeds a Helix decode server as is) and "
            "put --enable-helix on the --disaggregation-mode decode server")
    backend = str(getattr(view, "disaggregation_transfer_backend", "mooncake"))
    if backend not in PD_BACKENDS:
        raise HelixConfigError(
            f"Helix: --disaggregation-transfer-backend {backend}: the Helix relayout (each KVP "
            "rank receives only its pages) is implemented for mooncake; use "
            "--disaggregation-transfer-backend mooncake (or mooncake_tcp)")
    if getattr(view, "disaggregation_decode_enable_offload_kvcache", False):
        raise HelixConfigError("Helix: --disaggregation-decode-enable-offload-kvcache copies KV "
                               "by loc into a host pool; drop it")
    if float(getattr(view, "disaggregation_decode_host_receive_threshold", 1) or 1) < 1:
        raise HelixConfigError("Helix: --disaggregation-decode-host-receive-threshold < 1 "
                               "receives KV into a host pool; leave it at 1")
    backup = getattr(view, "disaggregation_decode_retraction_backup", None)
    if backup not in (None, "none", HELIX_RETRACTION_BACKUP):
        raise HelixConfigError(
            f"Helix: --disaggregation-decode-retraction-backup {backup} mirrors a retracted "
            "request's KV into a HiCache host pool by loc, which Helix pools (1/KVP of the pages "
            "per rank) do not support; use --disaggregation-decode-retraction-backup "
            f"{HELIX_RETRACTION_BACKUP} (the Helix default: each KVP rank backs up and restores "
            "its own pages) or none (a retracted request gets 503)")


def describe_serving(helix_cfg: Any, hf: dict, ep_size: int = 1) -> str:
    """The helix_cfg line logged once: N, KVP, TPA, FFN TP/EP, page size, backend."""
    n = helix_cfg.world_size
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or 0
    ffn = (f"MoE TP {n // ep_size} x EP {ep_size} = {n} ({int(experts)} experts)" if experts
           else f"dense TP = {n}")
    return (f"{describe(helix_cfg)}; N={n} = KVP {helix_cfg.kvp} x TPA {helix_cfg.tpa}; FFN {ffn}; "
            f"page_size={helix_cfg.page_size}; attention backend helix (prefill + decode)")



def resolution_hook_live(step: str, hook: Callable) -> bool:
    """True if SGLang's resolution-hook table holds `hook` for `step`."""
    from sglang.srt.arg_groups import resolution_hooks

    return hook in resolution_hooks._HOOKS.get(step, ())
