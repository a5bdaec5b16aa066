"""The Helix launch rules run inside SGLang's argument resolution (SGLang glue only: every
decision is sglang_helix.rules').

Two resolution hooks (sglang.srt.arg_groups.resolution_hooks), each wrapping the built-in step
and running it first:
- early (`validate_prefill_cp_platform`: before model-path resolution, downloads and the dummy
  model short-cut): hook liveness, `rules.check_server_flags` (the refusals that need only the
  flags), CPU multi-rank env; without --page-size, declares `page_size = 64`
  (rules.kv_cache.HELIX_DEFAULT_PAGE_SIZE) before SGLang's own default (1) and the backends'
  page-size constraints resolve it, so everything after sees the Helix page size;
- late (`handle_other_validations`: attention backend, speculative settings and page size are
  resolved, the HF config is loaded but no weights): `rules.check_launch` on the resolved
  settings and the model's config, PD hook liveness; stores the HelixConfig on ServerArgs
  (srt.state.CONFIG_ATTR), declares `prefill/decode_attention_backend = "helix"`, the PD
  retraction backup and the CUDA-graph phases, and logs the resolved layout once (with the
  attention groups: DP attention and PP stages each shard their own TP group the same way).
Every refusal is a HelixConfigError naming the flag and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..config import describe
from ..rules import check_launch, check_server_flags
from ..rules.argv import parse_helix_env
from ..rules.flags import ENV_VAR, HelixServerArgs
from ..rules.graphs import PREFILL_GRAPH_REASON, decode_graph_blocker
from ..rules.kv_cache import DEFAULT_PAGE_SIZE_REASON, helix_page_size
from ..rules.model import ModelInfo
from ..rules.pd import helix_retraction_backup, pd_mode
from ..rules.server import ServerLayout
from . import state
from .cpu.env import apply_cpu_env
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
    check_server_flags(helix, ServerLayout.of(view))
    declare_default_page_size(server_args, view)
    _apply_cpu_env_if_cpu(view)


def declare_default_page_size(server_args: Any, view: Any) -> None:
    """--page-size not given (still None: SGLang resolves its default 1 later): declare Helix's
    default so every later step (backend page constraints, chunked-prefill and CUDA-graph sizes,
    the pool) sees it. An explicit --page-size, 1 included, is left alone (the rules refuse 1)."""
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
    view = resolving_view(server_args)
    server = ServerLayout.of(view)
    helix_cfg = check_launch(helix, server, ModelInfo.from_hf_config(hf))
    if pd_mode(server) != "null":
        verify_pd_hooks()
    setattr(server_args, state.CONFIG_ATTR, helix_cfg)
    backup = helix_retraction_backup(server)
    if backup is not None:
        declare_resolution(server_args, "sglang_helix", disaggregation_decode_retraction_backup=backup)
    declare_resolution(server_args, "sglang_helix", prefill_attention_backend="helix",
                       decode_attention_backend="helix",
                       cuda_graph_config=graph_config(helix_cfg, view))
    logger.info("sglang_helix: Helix layout %s", describe_serving(helix_cfg, hf, server))
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


def describe_serving(helix_cfg: Any, hf: dict, server: ServerLayout = ServerLayout()) -> str:
    """The helix_cfg line logged once: N, KVP, TPA, the attention groups (DP attention, PP stages)
    and DP replicas, FFN TP/EP, page size, backend."""
    n = helix_cfg.world_size
    tp, ep = max(server.tp_size, n), server.ep_size
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or 0
    ffn = (f"MoE TP {tp // ep} x EP {ep} = {tp} ({int(experts)} experts)" if experts
           else f"dense TP = {tp}")
    groups = [f"{count} {what}" for count, what in ((server.attention_dp_size, "DP-attention groups"),
                                                   (server.pp_size, "PP stages"),
                                                   (server.dp_replicas, "DP replicas")) if count > 1]
    where = f" in each of {' x '.join(groups)}" if groups else ""
    return (f"{describe(helix_cfg)}; N={n} = KVP {helix_cfg.kvp} x TPA {helix_cfg.tpa}{where}; "
            f"FFN {ffn}; page_size={helix_cfg.page_size}; attention backend helix (prefill + decode)")
