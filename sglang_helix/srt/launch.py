"""Pure rules for one whole launch, on top of the flag rules of srt.args (no SGLang import).

- page size: `helix_page_size` is what Helix declares when --page-size is not given
  (HELIX_DEFAULT_PAGE_SIZE, 64; srt.validate declares it during SGLang's resolution);
  `check_page_size` refuses a page size < 2.
- KV dtype: `check_kv_cache_dtype` refuses a block-scaled --kv-cache-dtype (fp8_e4m3 / fp8_e5m2
  pages are served: per-tensor scales, kernels/kv_quant.py).
- MLA weights: `check_mla_weights` refuses an MLA checkpoint quantized other than fp8 (e4m3: block,
  per-channel or per-tensor scales); `is_helix_mla_weight` is the dtype predicate
  (srt.models.deepseek checks the loaded modules).
- `check_launch` runs every pure refusal on one launch (`layout_from_argv` reads the SGLang flags
  of a launch line); the planner CLI (sglang_helix.plan) checks its launch lines with it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..config import HelixConfig
from .args import HelixServerArgs, ModelInfo, ServerLayout, refuse, resolve_helix_args

# --page-size not given: SGLang resolves it to 1, which the Helix allocator cannot color, so the
# plugin declares this instead. 64 is a size every backend with a Helix path
# (args.HELIX_ATTENTION_BACKENDS) accepts: FlashMLA needs exactly 64 and TRT-LLM MLA 32 or 64
# (SGLang 0.5.23 forces them there); flashinfer, fa3, triton and the CPU torch path take any page
# size, and SGLang's default chunked-prefill sizes are multiples of 64.
HELIX_DEFAULT_PAGE_SIZE = 64
DEFAULT_PAGE_SIZE_REASON = (
    "FlashMLA needs 64, TRT-LLM MLA 32 or 64, the other Helix backends take any size >= 2; "
    "SGLang's own default 1 cannot be colored by KVP owner"
)
# Weight dtypes the Helix MLA path replicates and applies (srt.models.deepseek): unquantized as
# they are; fp8 (e4m3) through SGLang's own fp8 linear method and its W_UK/W_UV conversion.
UNQUANTIZED_WEIGHT_DTYPES = frozenset({"bf16", "fp16", "fp32"})
HELIX_MLA_WEIGHT_DTYPES = UNQUANTIZED_WEIGHT_DTYPES | {"fp8"}
# --kv-cache-dtype values whose pools carry block scales: Helix pools hold plain or per-tensor fp8.
BLOCK_SCALED_KV_DTYPES = frozenset({"mxfp8", "nvfp4", "fp4_mx_block16"})
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  "float": "fp32", "float8_e4m3fn": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8"}


def helix_page_size(page_size: int | None) -> int | None:
    """The page size Helix declares for a launch: HELIX_DEFAULT_PAGE_SIZE when --page-size was not
    given (`page_size` None, as SGLang keeps it until its own default resolves it to 1), else None:
    the given value stands, and check_page_size refuses it if it is < 2."""
    return HELIX_DEFAULT_PAGE_SIZE if page_size is None else None


def check_page_size(page_size: int | None) -> None:
    """Refuse a resolved page size < 2 (None counts as SGLang's default 1)."""
    if int(page_size or 1) < 2:
        refuse(
            f"--page-size {page_size}: the Helix allocator colors whole pages by KVP owner and "
            "SGLang's page-size-1 path allocates without positions; use --page-size 16 "
            "(or any >= 2)"
        )


def check_kv_cache_dtype(kv_cache_dtype: str | None) -> None:
    """Refuse a block-scaled --kv-cache-dtype: Helix pools hold plain or fp8 (per-tensor scale)
    pages; auto, bf16/bfloat16, fp8_e4m3 and fp8_e5m2 pass (None: not given, auto)."""
    if kv_cache_dtype in BLOCK_SCALED_KV_DTYPES:
        refuse(
            f"--kv-cache-dtype {kv_cache_dtype}: Helix pools store plain or fp8 (per-tensor scale) "
            "KV pages, not block-scaled ones; use --kv-cache-dtype auto, bf16, fp8_e4m3 or fp8_e5m2"
        )


def weight_dtype_name(dtype: Any) -> str:
    """'bf16' for torch.bfloat16 / 'bfloat16' / 'bf16' (and fp16, fp32 likewise); other dtypes
    (fp8, fp4, int8, ...) come back as given, lower case, without a 'torch.' prefix."""
    name = str(dtype).lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def is_unquantized_weight(dtype: Any) -> bool:
    """True for the weight dtypes the Helix MLA path replicates and bmm's as is (bf16/fp16/fp32)."""
    return weight_dtype_name(dtype) in UNQUANTIZED_WEIGHT_DTYPES


def is_helix_mla_weight(dtype: Any) -> bool:
    """True for the MLA checkpoint dtypes Helix serves: bf16/fp16/fp32 and fp8 (e4m3)."""
    return weight_dtype_name(dtype) in HELIX_MLA_WEIGHT_DTYPES


def check_mla_weights(model: ModelInfo, weights: Any) -> None:
    """Refuse an MLA checkpoint quantized other than fp8: every Helix MLA rank gathers the q
    projection and W_UK of all heads (fp8 ones with their scales) and applies them with SGLang's
    own linear method (srt.models.deepseek checks the loaded modules again at weight load).
    `weights`: the checkpoint's dtype ('bf16', 'fp8', torch.float8_e4m3fn, 'fp4', ...) or None
    (unknown: left to the weight-load check)."""
    if not model.is_mla or weights is None or is_helix_mla_weight(weights):
        return
    refuse(
        f"--enable-helix with {weight_dtype_name(weights)} weights ({model.architecture}): the "
        "Helix MLA path serves bf16/fp16/fp32 and fp8 (e4m3, block or per-tensor scales) "
        "checkpoints; serve the fp8 or bf16 checkpoint or drop --enable-helix"
    )


def check_launch(
    helix_args: HelixServerArgs, server: ServerLayout, model_info: ModelInfo, weights: Any = None
) -> HelixConfig | None:
    """The pure refusals a planner launch line can trip (flags, model, page size with Helix's
    default applied, MLA weight dtype; planner lines never disable chunked prefill, which
    check_chunked_prefill refuses at launch); the HelixConfig it resolves to, or None without
    --enable-helix."""
    if not helix_args.enable_helix:
        return None
    if server.page_size is None:
        server = replace(server, page_size=helix_page_size(None))
    config = resolve_helix_args(helix_args, server, model_info)
    check_page_size(server.page_size)
    check_kv_cache_dtype(server.kv_cache_dtype)
    check_mla_weights(model_info, weights)
    return config


def layout_from_argv(argv: Sequence[str]) -> ServerLayout:
    """The ServerLayout a launch line asks for, from SGLang's spellings of its flags (other flags
    are ignored; nothing is resolved: an absent flag keeps ServerLayout's unset default)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    defaults = ServerLayout()
    for flags, dest, kind in _SERVER_FLAGS:
        if kind is bool:
            parser.add_argument(*flags, dest=dest, action="store_true")
        else:
            parser.add_argument(*flags, dest=dest, type=kind, default=getattr(defaults, dest))
    known, _unknown = parser.parse_known_args(list(argv))
    return ServerLayout(**vars(known))


# SGLang 0.5.23's option strings for the ServerLayout fields (ServerArgs.add_cli_args).
_SERVER_FLAGS: tuple[tuple[tuple[str, ...], str, Any], ...] = (
    (("--tp-size", "--tensor-parallel-size"), "tp_size", int),
    (("--pp-size", "--pipeline-parallel-size"), "pp_size", int),
    (("--dcp-size", "--decode-context-parallel-size"), "dcp_size", int),
    (("--attn-cp-size", "--attention-context-parallel-size"), "attn_cp_size", int),
    (("--attn-dp-size", "--attention-data-parallel-size"), "attn_dp_size", int),
    (("--ep-size", "--expert-parallel-size", "--ep"), "ep_size", int),
    (("--enable-prefill-cp",), "enable_prefill_cp", bool),
    (("--speculative-algorithm",), "speculative_algorithm", str),
    (("--speculative-ngram-max-bfs-breadth",), "speculative_ngram_max_bfs_breadth", int),
    (("--speculative-eagle-topk",), "speculative_eagle_topk", int),
    (("--speculative-num-steps",), "speculative_num_steps", int),
    (("--speculative-num-draft-tokens",), "speculative_num_draft_tokens", int),
    (("--speculative-draft-model-path",), "speculative_draft_model_path", str),
    (("--model-path",), "model_path", str),
    (("--kv-cache-dtype",), "kv_cache_dtype", str),
    (("--device",), "device", str),
    (("--attention-backend",), "attention_backend", str),
    (("--prefill-attention-backend",), "prefill_attention_backend", str),
    (("--decode-attention-backend",), "decode_attention_backend", str),
    (("--page-size",), "page_size", int),
)


def check_chunked_prefill(chunked_prefill_size: int | None) -> None:
    """Refuse an explicitly disabled chunked prefill (--chunked-prefill-size <= 0): a long prompt
    would run as one forward, its activations and KV writes growing with the whole prompt.
    None (not given) is fine: SGLang then picks a bounded default for the device."""
    if chunked_prefill_size is not None and int(chunked_prefill_size) <= 0:
        refuse(
            f"--chunked-prefill-size {chunked_prefill_size} disables chunked prefill, so a long "
            "prompt is prefilled in one forward; give a positive size (e.g. 8192) or leave the "
            "flag out for SGLang's default"
        )


def decode_graph_blocker(cfg: HelixConfig, device: str, speculative: str | None = None) -> str | None:
    """Why Helix decode must run without CUDA graphs here, or None (SGLang may capture it).

    The helix backends plan each batch outside the graph into buffers allocated once and run
    static-shape kernels with no host sync inside (tests/multirank/test_decode_graph_safe.py);
    what has not been shown capture-safe keeps graphs off, with this reason logged.
    """
    if str(device) != "cuda":
        return f"device {device}: SGLang captures CUDA graphs on CUDA only"
    if cfg.hopb_slices > 1:
        return ("--helix-hopb-slices > 1 issues asynchronous collectives inside the step, whose "
                "capture is not verified yet")
    if speculative:
        return (f"--speculative-algorithm {speculative}: the helix backend plans each target-verify "
                "batch on the host (like an extend chunk)")
    if cfg.comm_backend == "nvshmem":
        return "--helix-comm-backend nvshmem (symmetric memory) capture is not verified yet"
    return None


PREFILL_GRAPH_REASON = "the helix extend path plans each chunk on the host"
