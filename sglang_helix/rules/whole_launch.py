"""The whole-launch check: every Helix launch rule in one call, shared by the plugin's
resolution hooks (srt.resolution) and the planner (sglang_helix.plan, perf.search).

- `check_server_flags(helix, server)`: the rules that need only the server flags (the plugin
  runs them early, before SGLang resolves the model path, downloads or loads the config);
- `check_launch(helix, server, model, weights)`: all of them, the model's included, on the
  resolved settings (the plugin, late) or a launch line's flags (the planner); returns the
  HelixConfig the launch serves. A page size not given counts as Helix's default (the plugin
  declares it early), so a line the planner prints checks exactly as the plugin will.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import HelixConfig
from .features import (check_attention_backends, check_attention_dp, check_device, check_model_path,
                       check_parallelism, check_scheduling)
from .flags import HelixServerArgs
from .kv_cache import check_kv_cache_dtype, check_page_size, helix_page_size
from .model import ModelInfo, check_architecture, check_mla_weights
from .pd import check_pd
from .server import ServerLayout
from .sizes import check_ep, check_sizes_vs_tp, helix_config
from .speculative import check_speculative


def check_server_flags(helix: HelixServerArgs, server: ServerLayout) -> None:
    """Refusals that need only the server flags (no model config); nothing without --enable-helix."""
    if not helix.enable_helix:
        return
    check_model_path(server)
    check_parallelism(server)
    check_scheduling(server)
    check_pd(server)
    check_speculative(server)
    check_device(helix, server)
    check_sizes_vs_tp(helix, server)
    check_kv_cache_dtype(server.kv_cache_dtype)


def check_launch(helix: HelixServerArgs, server: ServerLayout, model: ModelInfo,
                 weights: Any = None) -> HelixConfig | None:
    """Every Helix launch rule; the HelixConfig the launch serves, or None without --enable-helix.

    weights: the checkpoint's weight dtype ('bf16', 'fp8', 'fp4', a torch dtype) or None when not
    known (the MLA weight rule then runs at weight load, srt.models.deepseek)."""
    if not helix.enable_helix:
        return None
    if server.page_size is None:  # not given: the plugin declares Helix's default early
        server = replace(server, page_size=helix_page_size(None))
    check_server_flags(helix, server)
    check_architecture(model)
    check_speculative(server, is_mla=model.is_mla)
    check_attention_backends(server, model)
    check_attention_dp(server, model)
    check_ep(server, model.num_experts)
    check_page_size(server.page_size)
    check_mla_weights(model, weights)
    return helix_config(helix, server, model)
