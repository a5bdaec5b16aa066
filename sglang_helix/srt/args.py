"""Helix command-line flags as data, and the pure rules that turn them into a HelixConfig.

Flags (argparse group "Helix"; argparse is only touched by `add_helix_group` / `parse_helix_argv`):

    --enable-helix                     turn Helix decode on (off: the plugin changes nothing)
    --helix-kvp-size N                 KV-parallel ranks (default: TP / TPA)
    --helix-tpa-size N                 attention tensor-parallel ranks (default: MLA 1; GQA the
                                       largest valid TPA)
    --helix-comm-backend {a2a,ag_rs,nvshmem}
    --helix-hopb-slices N              HOP-B batch slices (1 = off)
    --helix-mla-exchange {latent,value} MLA only: exchange latent partials (W_UV after the
                                       merge) or values (replicated W_UV before the exchange)
    --helix-exchange-dtype {fp32,activation}  dtype of the exchanged partials (default fp32)

The flags as data (name, dest, default, help) are srt.flags.HELIX_FLAGS.

`resolve_helix_args(helix_args, server_args_like, model_info)` applies the defaults and refusals:

defaults
  MLA  -> TPA 1, KVP = TP, --helix-mla-exchange latent (config.DEFAULT_MLA_EXCHANGE).
  GQA  -> TPA = the largest t with t <= K, K % t == 0, H % t == 0, TP % t == 0; KVP = TP / t.
  Only one of the two sizes given -> the other is TP / given.
refusals (each message names the flag and the fix)
  KVP x TPA != --tp-size; TPA > KV heads; heads not divisible by TPA or by TP; TPA != 1 for MLA;
  --dcp-size > 1; --enable-prefill-cp; --attn-cp-size > 1; --attn-dp-size > 1; --pp-size > 1;
  speculative decoding but NGRAM chains and NEXTN chains on MLA (srt.spec_rules); --ep-size not
  dividing --tp-size and the experts; nvshmem off CUDA; an attention backend or architecture
  without a Helix path; --helix-mla-exchange for GQA.

The launch-level rules (default page size, page size and MLA weight dtype refusals, a whole
launch line checked at once) are in srt.launch.

Attention backends with a Helix path (the backends whose decode kernels give partial output +
LSE; Helix serves prefill and decode with its own "helix" backend on top of them; unset means "let SGLang pick", checked again once resolved):
  cpu:  torch_native, triton (TRITON_INTERPRET). Not intel_amx: it needs the real CPU sgl-kernel.
  cuda: triton, flashinfer, fa3 (MHA/GQA and MLA); flashmla, trtllm_mla (MLA only).
Architectures with a Helix path: DeepSeek-V2/V3-style MLA (DeepseekV2ForCausalLM,
DeepseekV3ForCausalLM) and GQA whose attention layer srt.models.gqa hooks (LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import (COMM_BACKENDS, DEFAULT_EXCHANGE_DTYPE, DEFAULT_MLA_EXCHANGE, EXCHANGE_DTYPES,
                      MLA_EXCHANGES, HelixConfig, HelixConfigError)
from .flags import HELIX_FLAGS
from .spec_rules import SpecFlags, check_speculative

GROUP_TITLE = "Helix"
GROUP_DESCRIPTION = (
    "Helix parallelism for decode (sglang-helix plugin): the KV cache is sharded by page across "
    "KVP ranks, heads across TPA ranks; KVP x TPA must equal --tp-size."
)
ENV_VAR = "SGLANG_HELIX"

MLA_ARCHITECTURES = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"})
# Exactly the architectures whose attention class sglang_helix.srt.models.gqa hooks
# (GQA_ATTENTION_CLASSES there; a test keeps the two equal). MistralForCausalLM is
# SGLang's LlamaForCausalLM subclass, so it builds the hooked LlamaAttention.
GQA_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
HELIX_ATTENTION_BACKENDS: Mapping[str, frozenset[str]] = {
    "cpu": frozenset({"torch_native", "triton"}),
    "cuda": frozenset({"triton", "flashinfer", "fa3", "flashmla", "trtllm_mla"}),
}
MLA_ONLY_BACKENDS = frozenset({"flashmla", "trtllm_mla"})

@dataclass(frozen=True)
class HelixServerArgs:
    """The Helix flags as parsed (not yet checked against the model or the server layout)."""

    enable_helix: bool = False
    helix_kvp_size: int | None = None
    helix_tpa_size: int | None = None
    helix_comm_backend: str = "a2a"
    helix_hopb_slices: int = 1
    helix_mla_exchange: str | None = None
    helix_exchange_dtype: str = DEFAULT_EXCHANGE_DTYPE

    def __post_init__(self) -> None:
        for flag, value in (("--helix-kvp-size", self.helix_kvp_size),
                            ("--helix-tpa-size", self.helix_tpa_size)):
            if value is not None and value < 1:
                refuse(f"{flag} {value}: must be >= 1 (or leave it out to use the default)")
        if self.helix_hopb_slices < 1:
            refuse(f"--helix-hopb-slices {self.helix_hopb_slices}: must be >= 1 (1 = HOP-B off)")
        if self.helix_comm_backend not in COMM_BACKENDS:
            refuse(
                f"--helix-comm-backend {self.helix_comm_backend!r}: choose one of "
                f"{', '.join(COMM_BACKENDS)}"
            )
        if self.helix_mla_exchange is not None and self.helix_mla_exchange not in MLA_EXCHANGES:
            refuse(
                f"--helix-mla-exchange {self.helix_mla_exchange!r}: choose one of "
                f"{', '.join(MLA_EXCHANGES)}"
            )
        if self.helix_exchange_dtype not in EXCHANGE_DTYPES:
            refuse(f"--helix-exchange-dtype {self.helix_exchange_dtype!r}: choose one of "
                   f"{', '.join(EXCHANGE_DTYPES)}")
        if not self.enable_helix and self.explicit_flags():
            refuse(
                f"{', '.join(self.explicit_flags())} given without --enable-helix: "
                "add --enable-helix, or drop the Helix flags"
            )

    def explicit_flags(self) -> list[str]:
        """Flags whose value differs from the default (to catch Helix flags without Helix)."""
        defaults = HelixServerArgs.__dataclass_fields__
        return [
            flag.flag for flag in HELIX_FLAGS
            if flag.dest != "enable_helix" and getattr(self, flag.dest) != defaults[flag.dest].default
        ]


@dataclass(frozen=True)
class ModelInfo:
    """What Helix needs to know about a model, from its HF config.json (no weights)."""

    architecture: str
    num_heads: int
    num_kv_heads: int
    is_mla: bool
    num_experts: int = 0  # routed experts of an MoE model; 0: dense, or not known

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        """DeepSeek-style MLA is recognised by `kv_lora_rank`; it has one latent KV head."""
        architectures = config.get("architectures") or ["<missing architectures>"]
        num_heads = int(config["num_attention_heads"])
        is_mla = config.get("kv_lora_rank") is not None
        kv_heads = 1 if is_mla else int(config.get("num_key_value_heads") or num_heads)
        experts = int(config.get("n_routed_experts") or config.get("num_local_experts") or 0)
        return cls(str(architectures[0]), num_heads, kv_heads, is_mla, experts)


@dataclass(frozen=True)
class ServerLayout:
    """The SGLang server settings Helix depends on, read off any ServerArgs-like object."""

    tp_size: int = 1
    pp_size: int = 1
    dcp_size: int = 1
    attn_cp_size: int = 1
    attn_dp_size: int = 1
    ep_size: int = 1
    enable_prefill_cp: bool = False
    speculative_algorithm: str | None = None
    speculative_ngram_max_bfs_breadth: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_steps: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_draft_model_path: str | None = None
    model_path: str | None = None
    device: str | None = None
    attention_backend: str | None = None
    prefill_attention_backend: str | None = None
    decode_attention_backend: str | None = None
    page_size: int | None = None
    kv_cache_dtype: str | None = None  # checked by srt.launch.check_kv_cache_dtype

    @classmethod
    def of(cls, server_args_like: Any) -> ServerLayout:
        defaults = cls()
        values = {n: getattr(server_args_like, n, getattr(defaults, n)) for n in cls.__dataclass_fields__}
        return cls(**values)

    def spec_flags(self) -> SpecFlags:
        return SpecFlags(self.speculative_algorithm, self.speculative_ngram_max_bfs_breadth,
                         self.speculative_eagle_topk, self.speculative_num_steps,
                         self.speculative_num_draft_tokens, self.speculative_draft_model_path,
                         self.model_path)


# ---------------------------------------------------------------- argparse edge


def add_helix_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "Helix" argument group to `parser` (idempotent)."""
    for group in parser._action_groups:
        if group.title == GROUP_TITLE:
            return group
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    for flag in HELIX_FLAGS:
        flag.add_to(group)
    return group


def helix_args_from_namespace(namespace: argparse.Namespace) -> HelixServerArgs:
    values = {f.dest: getattr(namespace, f.dest) for f in HELIX_FLAGS if hasattr(namespace, f.dest)}
    return HelixServerArgs(**values)


def parse_helix_argv(argv: Sequence[str]) -> HelixServerArgs:
    """Pick the Helix flags out of a full SGLang argv (other flags are ignored)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_helix_group(parser)
    known, _unknown = parser.parse_known_args(list(argv))
    return helix_args_from_namespace(known)


def parse_helix_env(value: str | None) -> HelixServerArgs | None:
    """SGLANG_HELIX="--enable-helix --helix-kvp-size 2": the same flags, for sglang.Engine users."""
    if not value or not value.strip():
        return None
    return parse_helix_argv(shlex.split(value))


# ---------------------------------------------------------------- pure rules


def check_server_compat(helix: HelixServerArgs, server: ServerLayout) -> None:
    """Refusals that need only the server flags (run before the model config is read)."""
    if not helix.enable_helix:
        return
    _check_features(server)
    _check_device(helix, server)
    _check_sizes_vs_tp(helix, server)


def resolve_helix_args(
    helix_args: HelixServerArgs, server_args_like: Any, model_info: ModelInfo
) -> HelixConfig | None:
    """The validated Helix layout, or None when --enable-helix is absent."""
    if not helix_args.enable_helix:
        return None
    server = ServerLayout.of(server_args_like)
    check_server_compat(helix_args, server)
    _check_architecture(model_info)
    check_speculative(server.spec_flags(), is_mla=model_info.is_mla)
    _check_attention_backends(server, model_info)
    _check_ep(server, model_info.num_experts)
    kvp, tpa = _resolve_sizes(helix_args, server.tp_size, model_info)
    return HelixConfig(
        kvp=kvp,
        tpa=tpa,
        num_heads=model_info.num_heads,
        num_kv_heads=model_info.num_kv_heads,
        mla=model_info.is_mla,
        page_size=server.page_size or 1,
        comm_backend=helix_args.helix_comm_backend,
        hopb_slices=helix_args.helix_hopb_slices,
        mla_exchange=_resolve_mla_exchange(helix_args, model_info),
        exchange_dtype=helix_args.helix_exchange_dtype,
    )


def _resolve_mla_exchange(helix: HelixServerArgs, model: ModelInfo) -> str:
    """MLA: the flag, else DEFAULT_MLA_EXCHANGE. GQA: the flag is refused (no W_UV to move)."""
    if model.is_mla:
        return helix.helix_mla_exchange or DEFAULT_MLA_EXCHANGE
    if helix.helix_mla_exchange is not None:
        refuse(
            f"--helix-mla-exchange {helix.helix_mla_exchange} applies to MLA models only "
            f"(DeepSeek-V2/V3); {model.architecture} is GQA/MHA, whose exchange already moves "
            "head_dim-wide values: drop --helix-mla-exchange"
        )
    return "latent"


def default_tpa(tp_size: int, model: ModelInfo) -> int:
    """MLA: 1. GQA: largest t <= K with K % t == H % t == TP % t == 0."""
    if model.is_mla:
        return 1
    candidates = [
        t for t in range(1, model.num_kv_heads + 1)
        if model.num_kv_heads % t == 0 and model.num_heads % t == 0 and tp_size % t == 0
    ]
    return max(candidates)


def describe(config: HelixConfig) -> str:
    """One-line layout summary for logs and error messages."""
    kind = "MLA" if config.mla else "GQA"
    return (
        f"{kind} KVP={config.kvp} x TPA={config.tpa} (N={config.world_size}), "
        f"H={config.num_heads}, K={config.num_kv_heads}, page_size={config.page_size}, "
        f"comm={config.comm_backend}, hopb_slices={config.hopb_slices}, "
        f"exchange_dtype={config.exchange_dtype}"
        + (f", mla_exchange={config.mla_exchange}" if config.mla else "")
    )


def _check_features(server: ServerLayout) -> None:
    if server.pp_size > 1:
        refuse(f"--pp-size {server.pp_size}: Helix needs pipeline parallel 1; drop --pp-size")
    if server.dcp_size > 1:
        refuse(
            f"--dcp-size {server.dcp_size}: SGLang's decode context parallel and Helix both shard "
            "the KV cache; use one of them (drop --dcp-size, Helix's KVP replaces it)"
        )
    if server.enable_prefill_cp:
        refuse("--enable-prefill-cp is not supported with Helix; drop --enable-prefill-cp")
    if server.attn_cp_size > 1:
        refuse(f"--attn-cp-size {server.attn_cp_size}: not supported with Helix; drop --attn-cp-size")
    if server.attn_dp_size > 1:
        refuse(
            f"--attn-dp-size {server.attn_dp_size}: attention data parallel changes the attention "
            "TP group Helix shards; drop --attn-dp-size (use --dp-size replicas instead)"
        )
    check_speculative(server.spec_flags())


def _check_device(helix: HelixServerArgs, server: ServerLayout) -> None:
    if helix.helix_comm_backend == "nvshmem" and (server.device or "cuda") != "cuda":
        refuse(
            f"--helix-comm-backend nvshmem needs CUDA (device={server.device!r}); "
            "use --helix-comm-backend a2a"
        )


def _check_sizes_vs_tp(helix: HelixServerArgs, server: ServerLayout) -> None:
    kvp, tpa, tp = helix.helix_kvp_size, helix.helix_tpa_size, server.tp_size
    if kvp is not None and tpa is not None and kvp * tpa != tp:
        refuse(
            f"--helix-kvp-size {kvp} x --helix-tpa-size {tpa} = {kvp * tpa} != --tp-size {tp}: "
            f"Helix reuses the TP ranks; set --tp-size {kvp * tpa} or sizes whose product is {tp}"
        )
    for flag, given in (("--helix-kvp-size", kvp), ("--helix-tpa-size", tpa)):
        if given is not None and tp % given:
            refuse(f"{flag} {given} does not divide --tp-size {tp}; pick a divisor of {tp}")
    _check_ep(server)


def _check_ep(server: ServerLayout, experts: int = 0) -> None:  # experts 0: dense / unknown
    ep, tp, also = server.ep_size, server.tp_size, f" and the {experts} routed experts" * bool(experts)
    if ep < 1 or tp % ep or (experts and experts % ep):
        refuse(f"--ep-size {ep} must divide --tp-size {tp}{also}: with Helix the FFN runs as TP x EP "
               f"on the same N = KVP x TPA = {tp} ranks; pick such an --ep-size (1 = no EP)")


def _check_architecture(model: ModelInfo) -> None:
    known = MLA_ARCHITECTURES if model.is_mla else GQA_ARCHITECTURES
    if model.architecture not in known:
        supported = ", ".join(sorted(MLA_ARCHITECTURES | GQA_ARCHITECTURES))
        refuse(
            f"--enable-helix: architecture {model.architecture} "
            f"({'MLA' if model.is_mla else 'GQA/MHA'}) has no Helix path; supported: {supported}. "
            "Drop --enable-helix for this model"
        )


def _check_attention_backends(server: ServerLayout, model: ModelInfo) -> None:
    device = server.device or "cuda"
    allowed = HELIX_ATTENTION_BACKENDS.get(device)
    if allowed is None:
        refuse(f"--device {device}: Helix runs on {', '.join(HELIX_ATTENTION_BACKENDS)} only")
    if not model.is_mla:
        allowed = allowed - MLA_ONLY_BACKENDS
    for flag, backend in (
        ("--attention-backend", server.attention_backend),
        ("--prefill-attention-backend", server.prefill_attention_backend),
        ("--decode-attention-backend", server.decode_attention_backend),
    ):
        if backend is not None and backend not in allowed:
            refuse(
                f"{flag} {backend}: no Helix path for this backend on {device}"
                f"{'' if model.is_mla else ' with GQA'}; use {flag} "
                f"{' or '.join(sorted(allowed))}"
            )


def _resolve_sizes(helix: HelixServerArgs, tp: int, model: ModelInfo) -> tuple[int, int]:
    kvp, tpa = helix.helix_kvp_size, helix.helix_tpa_size
    if tpa is None:
        tpa = tp // kvp if kvp is not None else default_tpa(tp, model)
    if kvp is None:
        kvp = tp // tpa
    if kvp * tpa != tp:
        refuse(
            f"--helix-tpa-size {tpa} does not divide --tp-size {tp}; pick a divisor of {tp}"
        )
    _check_heads(tpa, kvp, tp, model)
    return kvp, tpa


def _check_heads(tpa: int, kvp: int, tp: int, model: ModelInfo) -> None:
    if model.is_mla and tpa != 1:
        refuse(
            f"--helix-tpa-size {tpa} with MLA ({model.architecture}): MLA has one latent KV head, "
            f"so TPA must be 1; set --helix-tpa-size 1 --helix-kvp-size {tp}"
        )
    if tpa > model.num_kv_heads:
        refuse(
            f"--helix-tpa-size {tpa} > the model's {model.num_kv_heads} KV heads: each TPA group "
            f"needs at least one KV head; use --helix-tpa-size <= {model.num_kv_heads} and "
            "raise --helix-kvp-size"
        )
    if model.num_kv_heads % tpa or model.num_heads % tpa:
        refuse(
            f"--helix-tpa-size {tpa} must divide both the {model.num_heads} query heads and the "
            f"{model.num_kv_heads} KV heads; pick a common divisor"
        )
    if model.num_heads % tp:
        refuse(
            f"--tp-size {tp} does not divide the model's {model.num_heads} query heads: after the "
            f"exchange each of KVP x TPA = {kvp * tpa} ranks owns H/N heads; pick a --tp-size "
            f"dividing {model.num_heads}"
        )


def refuse(message: str) -> None:
    """Raise the launch refusal every Helix rule uses: HelixConfigError("Helix: <flag + fix>")."""
    raise HelixConfigError(f"Helix: {message}")
