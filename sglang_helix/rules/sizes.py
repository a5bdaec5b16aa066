"""Layout sizes and heads: KVP and TPA from the flags and the model, the refusals on them, and
the HelixConfig they resolve to.

defaults
  MLA  -> TPA 1, KVP = TP, --helix-mla-exchange latent (config.DEFAULT_MLA_EXCHANGE).
  GQA  -> TPA = the largest t with t <= K, K % t == 0, H % t == 0, TP % t == 0; KVP = TP / t.
  Only one of the two sizes given -> the other is TP / given.
  TP here is the attention TP size: --tp-size, or --tp-size / D with D DP-attention groups (each
  group is its own Helix group; the FFN keeps TP x EP over all --tp-size ranks).
refusals (each message names the flag and the fix)
  KVP x TPA != the attention TP size; a size not dividing it; TPA > KV heads; heads not
  divisible by TPA or by TP; TPA != 1 for MLA; --ep-size not dividing --tp-size and the routed experts;
  --helix-mla-exchange for GQA.
"""

from __future__ import annotations

from ..config import DEFAULT_MLA_EXCHANGE, HelixConfig
from .flags import HelixServerArgs
from .model import ModelInfo
from .refusal import refuse
from .server import ServerLayout


def tp_words(server: ServerLayout) -> str:
    """How the attention TP size reads in a message: "--tp-size 4", or under DP attention
    "--tp-size 8 / 2 DP-attention groups = 4"."""
    dpa = server.attention_dp_size
    if dpa <= 1:
        return f"--tp-size {server.tp_size}"
    return f"--tp-size {server.tp_size} / {dpa} DP-attention groups = {server.attention_tp_size}"


def check_sizes_vs_tp(helix: HelixServerArgs, server: ServerLayout) -> None:
    """The refusals on the sizes that need only the flags (no model)."""
    kvp, tpa, tp = helix.helix_kvp_size, helix.helix_tpa_size, server.attention_tp_size
    scale = server.tp_size // tp
    if kvp is not None and tpa is not None and kvp * tpa != tp:
        refuse(f"--helix-kvp-size {kvp} x --helix-tpa-size {tpa} = {kvp * tpa} != {tp_words(server)}: "
               f"Helix reuses the attention TP ranks; set --tp-size {kvp * tpa * scale} or sizes "
               f"whose product is {tp}")
    for flag, given in (("--helix-kvp-size", kvp), ("--helix-tpa-size", tpa)):
        if given is not None and tp % given:
            refuse(f"{flag} {given} does not divide {tp_words(server)}; pick a divisor of {tp}")
    check_ep(server)


def check_ep(server: ServerLayout, experts: int = 0) -> None:
    """--ep-size must divide TP (and the routed experts; experts 0: dense or not known)."""
    ep, tp, also = server.ep_size, server.tp_size, f" and the {experts} routed experts" * bool(experts)
    if ep < 1 or tp % ep or (experts and experts % ep):
        refuse(f"--ep-size {ep} must divide --tp-size {tp}{also}: with Helix the FFN runs as TP x EP "
               f"on the same {tp} ranks as attention; pick such an --ep-size (1 = no EP)")


def default_tpa(tp_size: int, model: ModelInfo) -> int:
    """MLA: 1. GQA: largest t <= K with K % t == H % t == TP % t == 0."""
    if model.is_mla:
        return 1
    return max(t for t in range(1, model.num_kv_heads + 1)
               if model.num_kv_heads % t == 0 and model.num_heads % t == 0 and tp_size % t == 0)


def helix_config(helix: HelixServerArgs, server: ServerLayout, model: ModelInfo) -> HelixConfig:
    """The HelixConfig of a launch: sizes resolved and checked against the model's heads.
    `server.page_size` must be resolved (the whole-launch check applies Helix's default)."""
    kvp, tpa = _resolve_sizes(helix, server.attention_tp_size, model)
    return HelixConfig(
        kvp=kvp, tpa=tpa, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        mla=model.is_mla, page_size=server.page_size or 1, comm_backend=helix.helix_comm_backend,
        hopb_slices=helix.helix_hopb_slices, mla_exchange=_resolve_mla_exchange(helix, model),
        exchange_dtype=helix.helix_exchange_dtype,
    )


def _resolve_mla_exchange(helix: HelixServerArgs, model: ModelInfo) -> str:
    """MLA: the flag, else DEFAULT_MLA_EXCHANGE. GQA: the flag is refused (no W_UV to move)."""
    if model.is_mla:
        return helix.helix_mla_exchange or DEFAULT_MLA_EXCHANGE
    if helix.helix_mla_exchange is not None:
        refuse(f"--helix-mla-exchange {helix.helix_mla_exchange} applies to MLA models only "
               f"(DeepSeek-V2/V3); {model.architecture} is GQA/MHA, whose exchange already moves "
               "head_dim-wide values: drop --helix-mla-exchange")
    return "latent"


def _resolve_sizes(helix: HelixServerArgs, tp: int, model: ModelInfo) -> tuple[int, int]:
    kvp, tpa = helix.helix_kvp_size, helix.helix_tpa_size
    if tpa is None:
        tpa = tp // kvp if kvp is not None else default_tpa(tp, model)
    if kvp is None:
        kvp = tp // tpa
    if kvp * tpa != tp:
        refuse(f"--helix-tpa-size {tpa} does not divide --tp-size {tp}; pick a divisor of {tp}")
    _check_heads(tpa, kvp, tp, model)
    return kvp, tpa


def _check_heads(tpa: int, kvp: int, tp: int, model: ModelInfo) -> None:
    if model.is_mla and tpa != 1:
        refuse(f"--helix-tpa-size {tpa} with MLA ({model.architecture}): MLA has one latent KV "
               f"head, so TPA must be 1; set --helix-tpa-size 1 --helix-kvp-size {tp}")
    if tpa > model.num_kv_heads:
        refuse(f"--helix-tpa-size {tpa} > the model's {model.num_kv_heads} KV heads: each TPA group "
               f"needs at least one KV head; use --helix-tpa-size <= {model.num_kv_heads} and "
               "raise --helix-kvp-size")
    if model.num_kv_heads % tpa or model.num_heads % tpa:
        refuse(f"--helix-tpa-size {tpa} must divide both the {model.num_heads} query heads and the "
               f"{model.num_kv_heads} KV heads; pick a common divisor")
    if model.num_heads % tp:
        refuse(f"--tp-size {tp} does not divide the model's {model.num_heads} query heads: after the "
               f"exchange each of KVP x TPA = {kvp * tpa} ranks owns H/N heads; pick a --tp-size "
               f"dividing {model.num_heads}")
