"""Every seam of sglang_helix into SGLang, one row each: the hook table.

A row names SGLang's dotted `target` (each exactly once), the `kind` of seam (HookRegistry
BEFORE / AFTER / AROUND / REPLACE, a RESOLUTION step wrapper, or a BACKEND registry entry; see
srt.hooks), the `owner` module under `sglang_helix.srt` and its function `fn` that runs there,
one line of why, and when it is installed: always (calling straight through unless the server
runs with Helix, or unless the CPU fix it carries applies), or only on SGLang's CPU engine where
the CPU fix named in `cpu_fix` is enabled (srt.cpu.fixes). A target that both Helix and a CPU fix
need is one row whose function does both (the Helix hook handles Helix and hands the Helix-off
case to the CPU fix's function).

Owners hold plain functions; the table resolves them by name when it installs or checks a row,
so importing this module imports no owner (and no SGLang): `register()` installs the CPU-engine
sgl_kernel stand-in before any owner that needs it is loaded. `installed_rows` picks the rows of
a process, `install` registers them, `missing` is the liveness check; docs/sglang-integration.md
lists the table as `markdown()` prints it (`python -m sglang_helix.srt.hook_table`; a test keeps
the two equal).

Targets are internal paths of SGLang 0.5.23 (srt.sglang_version: the supported range).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .cpu.fixes import CPU_FIXES, cpu_fix
from .hooks import SEAM_KINDS, install as install_seam, is_live

AREAS = {"cli": "Command line and argument resolution", "backend": "Attention backend",
         "state": "Distributed state", "memory": "KV memory", "models": "Model layers",
         "info": "/server_info", "spec": "Speculative decoding", "pd": "PD disaggregation",
         "cpu": "CPU-engine fixes"}
# Why a REPLACE row cannot wrap SGLang's function instead (said once, referenced by those rows).
NO_ORIGINAL = ("REPLACE: the target is the sgl-kernel CPU op SGLang's CPU branch calls; without a "
               "CPU sgl-kernel build the import-only stand-in raises, so there is no original to wrap")

_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_MLA = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
_DRAFT = "sglang.srt.speculative.draft_utils.DraftBackendFactory"
_CONN = "sglang.srt.disaggregation.mooncake.conn"
_FP8 = "sglang.srt.layers.quantization.fp8"
_SPEC_OPS = "sglang.kernels.ops.speculative"
_CT = "sglang.srt.layers.quantization.compressed_tensors"
_CT_W8A16 = f"{_CT}.schemes.compressed_tensors_w8a16_fp8.CompressedTensorsW8A16Fp8"
_FP4_LINEAR = "sglang.srt.layers.quantization.modelopt_quant.ModelOptFp4LinearMethod"
_FP4_MOE = "sglang.srt.layers.quantization.modelopt_quant.ModelOptNvFp4FusedMoEMethod"
_HICACHE = "sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller.HybridCacheController"


@dataclass(frozen=True)
class Seam:
    """One row of the hook table (see the module docstring)."""

    target: str
    kind: str
    owner: str
    fn: str
    why: str
    area: str
    cpu_fix: str | None = None
    cpu_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SEAM_KINDS:
            raise ValueError(f"{self.target}: seam kind {self.kind!r} not in {SEAM_KINDS}")
        if self.area not in AREAS:
            raise ValueError(f"{self.target}: area {self.area!r} not in {tuple(AREAS)}")
        if self.cpu_fix is not None:
            cpu_fix(self.cpu_fix)  # KeyError names the known fixes
        elif self.cpu_only:
            raise ValueError(f"{self.target}: a CPU-engine-only row names its CPU fix")

    @property
    def function(self) -> Callable:
        """The owner's function (imports the owner module)."""
        return getattr(importlib.import_module(f"sglang_helix.srt.{self.owner}"), self.fn)

    @property
    def when(self) -> str:
        """When the row is installed, as the docs' table says it."""
        if not self.cpu_only:
            return "always" + (f" (with CPU fix {self.cpu_fix})" if self.cpu_fix else "")
        opt_out = cpu_fix(self.cpu_fix).opt_out_env
        return f"CPU engine: fix {self.cpu_fix}" + (f" ({opt_out}=0: off)" if opt_out else "")


def _row(target: str, kind: str, owner_fn: str, why: str, area: str, cpu_fix: str | None = None,
         cpu_only: bool = False) -> Seam:
    owner, fn = owner_fn.rsplit(".", 1)
    return Seam(target, kind, owner, fn, why, area, cpu_fix, cpu_only)


def _cpu(target: str, kind: str, owner_fn: str, why: str, fix: str, area: str = "cpu") -> Seam:
    return _row(target, kind, owner_fn, why, area, fix, cpu_only=True)


TABLE = (
    # ---------------------------------------------------------------- command line, resolution
    _row("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", "plugin._after_add_cli_args",
         "adds the Helix argument group: the flags parse and show in --help", "cli"),
    _row("sglang.srt.server_args.prepare_server_args", "AROUND", "plugin._around_prepare_server_args",
         "parses the Helix flags (argv, --config YAML, SGLANG_HELIX) into ServerArgs._helix_args, "
         "which pickles to every rank", "cli"),
    _row("sglang.srt.arg_groups.parallel_hook.validate_prefill_cp_platform", "RESOLUTION",
         "plugin.early_resolution", "flag-only Helix rules (srt.resolution.early_validation), hook "
         "liveness, CPU multi-rank env, the Helix page size: before any model file is read", "cli"),
    _row("sglang.srt.arg_groups.serving_hook.handle_other_validations", "RESOLUTION",
         "plugin.late_resolution", "model-dependent Helix rules (srt.resolution.late_validation); "
         "stores the HelixConfig and declares the helix backend: before any weight loads", "cli"),
    # ---------------------------------------------------------------- backend, state
    _row("sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS.helix", "BACKEND",
         "backends.factory.create_helix_backend", "the \"helix\" attention backend (GQA or MLA by "
         "the pool's type) and its --attention-backend choice", "backend"),
    _row("sglang.srt.distributed.parallel_state.initialize_model_parallel", "AFTER",
         "state._after_initialize_model_parallel", "creates the KVP groups right after SGLang's "
         "TP groups (collective, same order on every rank)", "state"),
    # ---------------------------------------------------------------- KV memory
    _row(f"{_KVC}.configure", "AROUND", "memory.hooks._around_configure",
         "Helix on: steps over SGLang's CPU fp8-KV refusal (it guards SGLang's kernels, not "
         "Helix's); Helix off: hands configure to the CPU fp8-KV fix", "memory", "fp8-kv"),
    _row(f"{_KVC}._resolve_memory_pool_config", "AROUND", "cpu.fp8_kv_fix.restore_kv_dtype",
         "the real KV dtype back after configure's first check was stepped over (Helix on, or "
         "the CPU fp8-KV fix)", "memory", "fp8-kv"),
    _row(f"{_KVC}._build_token_to_kv_pool", "AROUND", "memory.hooks._around_build_pool",
         "this rank's Helix pool (1/KVP of the pages) in the bytes SGLang budgeted", "memory"),
    _row(f"{_KVC}._build_token_to_kv_pool_allocator", "AROUND", "memory.hooks._around_build_allocator",
         "the colored allocator (page id % KVP = owner); a NEXTN draft worker shares the "
         "target's", "memory"),
    _row(f"{_KVC}.logical_token_capacity", "AROUND", "memory.hooks._around_logical_capacity",
         "the scheduler's capacity in logical tokens of the Helix pool", "memory"),
    _row("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker."
         "_check_full_pool", "AROUND", "memory.hooks._around_check_full_pool",
         "the idle leak check counts every free page, not the min-color admission floor", "memory"),
    _row("sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler.build_kv_host_pool", "AROUND",
         "memory.host_hooks._around_build_kv_host_pool", "HiCache: this rank's host pool behind "
         "colored host page ids (1/KVP of the host pages per rank)", "memory"),
    _row(f"{_HICACHE}.allocate_host_transfers", "AROUND",
         "memory.host_hooks._around_allocate_host_transfers", "HiCache backup: host pages of the "
         "device pages' colors", "memory"),
    _row(f"{_HICACHE}.load", "AROUND", "memory.host_hooks._around_load",
         "HiCache load-back: device pages of the host pages' colors (never the position-less "
         "alloc)", "memory"),
    _row(f"{_HICACHE}.alloc_prefetch_host_buffers", "AROUND",
         "memory.host_storage._around_alloc_prefetch_host_buffers", "HiCache storage hit: host "
         "pages of the prefetched positions' colors", "memory"),
    _row("sglang.srt.managers.cache_controller.HiCacheController._generate_storage_config", "AROUND",
         "memory.host_storage._around_generate_storage_config", "HiCache storage: per-rank page "
         "files for MLA too (a Helix rank stores 1/KVP of the latent pages)", "memory"),
    _row("sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory._create_builtin_backend",
         "AROUND", "memory.host_storage._around_create_builtin_backend", "HiCache storage: the "
         "file backend per Helix rank (own pages written, existence per KVP group); others "
         "refused", "memory"),
    # ---------------------------------------------------------------- model layers
    _row("sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp", "AROUND",
         "models.gqa._around_unaligned_cpu_tp", "the true head counts back where SGLang's CPU "
         "engine pads them up to --tp-size (Helix shards attention TPA ways)", "models"),
    *(_row(f"sglang.srt.models.{module}.{cls}.__init__", "AROUND", "models.gqa._around_gqa_attention_init",
           f"{cls}: qkv_proj and heads sharded TPA ways (H/TPA query, K/TPA KV heads)", "models")
      for module, cls in (("llama", "LlamaAttention"), ("qwen2", "Qwen2Attention"),
                          ("qwen3", "Qwen3Attention"))),
    _row("sglang.srt.models.llama_eagle3.LlamaDecoderLayer.__init__", "AROUND",
         "models.eagle_draft._around_eagle3_layer_init", "EAGLE-3 draft layer: its 2 x hidden QKV "
         "projection rebuilt TPA ways (H/TPA query, K/TPA KV heads), like the target's", "models"),
    _row("sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin."
         "post_load_weights", "AFTER", "models.deepseek._after_post_load",
         "replicates the q projection and W_UK (+ W_UV for the value exchange) on every rank, "
         "once after loading", "models"),
    _row(f"{_MLA}.dispatch_attn_forward_method", "AROUND", "models.deepseek._around_dispatch",
         "every MLA forward takes the absorbed path on the helix backend", "models"),
    _row(f"{_MLA}.forward_absorb_prepare", "AROUND", "models.deepseek._around_prepare",
         "absorbed queries of all H heads and the new tokens' latent, on every rank", "models"),
    _row(f"{_MLA}.forward_absorb_core", "AROUND", "models.deepseek._around_core",
         "partial attention + one exchange on the helix MLA backend, then W_UV and o_proj for "
         "this rank's heads", "models"),
    # ---------------------------------------------------------------- /server_info
    _row("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController."
         "_add_memory_usage", "AFTER", "info._after_add_memory_usage",
         "Helix layout, per-KVP-rank pages, speculative counters and PD transfers", "info"),
    # ---------------------------------------------------------------- speculative decoding
    _row("sglang.srt.speculative.cpp_ngram.ngram_corpus.NgramCorpus.batch_get", "AROUND",
         "spec._around_batch_get", "NGRAM under Helix: draft masks become chain masks (padding "
         "drafts continue the chain)", "spec"),
    _row("sglang.srt.arg_groups.speculative_hook._handle_eagle_family", "AROUND",
         "spec._around_handle_eagle_family", "top-k > 1 at page size > 1: the helix backend (Helix "
         "on) and the CPU EAGLE fix's torch_native draft steps (Helix off) serve page trees, so "
         "SGLang's refusal outside flashinfer / fa3 / triton is stepped over", "spec", "eagle"),
    _row(f"{_DRAFT}.create_draft_extend_backend", "AROUND", "spec._around_draft_extend_backend",
         "draft extend (MTP layer, EAGLE / EAGLE-3 draft) on the draft runner's helix backend; "
         "Helix off: the CPU EAGLE fix "
         "(torch_native draft backend on the CPU engine)", "spec", "eagle"),
    _row(f"{_DRAFT}.create_decode_backend", "AROUND", "spec._around_draft_decode_backend",
         "multi-step draft decode (chains, trees) on helix backends; Helix off: the CPU EAGLE fix "
         "(torch_native multi-step draft backend on the CPU engine)", "spec", "eagle"),
    # ---------------------------------------------------------------- PD disaggregation
    _row(f"{_CONN}.MooncakeKVManager.build_receiver_registration_message", "AROUND",
         "pd._around_registration", "a Helix decode rank registers its TPA shard and a Helix tag", "pd"),
    _row(f"{_CONN}.MooncakeKVReceiver.send_metadata", "AROUND", "pd._around_send_metadata",
         "page ids become this rank's transfer slots (others to the sink slot)", "pd"),
    _row(f"{_CONN}.KVArgsRegisterInfo.from_zmq", "AROUND", "pd._around_from_zmq",
         "the prefill reads the Helix tag of a decode peer", "pd"),
    _row(f"{_CONN}.MooncakeKVManager.send_kvcache", "AROUND", "pd._around_send",
         "the prefill sends a Helix peer only its pages (1/KVP) and counts them", "pd"),
    _row(f"{_CONN}.MooncakeKVManager.send_kvcache_slice", "AROUND", "pd._around_send",
         "the same for SGLang's sliced send", "pd"),
    _row(f"{_CONN}.MooncakeKVManager._transfer_data", "AROUND", "pd._around_transfer_data",
         "bytes written per peer, for /server_info helix_pd", "pd"),
    _cpu(f"{_CONN}.MooncakeKVSender.__init__", "AROUND", "cpu.pd_fix._around_sender_init",
         "page indices by the host path (no pinned memory + CUDA event)", "pd-host-path", "pd"),
    _cpu("sglang.srt.mem_cache.kv_cache_builder.resolve_decode_retraction_backup", "AROUND",
         "cpu.pd_fix._around_retraction", "retraction backup cpu_tensor by default (host_pool "
         "pins memory with a CUDA driver)", "pd-host-path", "pd"),
    _cpu("sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin."
         "maybe_send_cached_prefix_chunk", "AROUND", "cpu.pd_fix._around_early_send",
         "skips the early send of a cached prefix under overlap (it records a CUDA event; the "
         "regular sends carry it)", "pd-host-path", "pd"),
    # ---------------------------------------------------------------- CPU-engine fixes
    _cpu("sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry."
         "get_handler", "AROUND", "cpu.mla_fix._around_get_handler",
         "torch_native MLA takes the absorbed path", "absorbed-mla"),
    _cpu("sglang.srt.mem_cache.pool_host.base.HostKVCache.__init__", "AROUND",
         "cpu.hicache_fix._around_host_kv_init", "HiCache host pools in plain (unpinned) host "
         "memory", "hicache"),
    *(_cpu(f"sglang.srt.mem_cache.pool_host.{module}.{cls}.{method}", "AROUND",
           f"cpu.hicache_fix.{fn}", f"{cls}: {what} by exact torch index copies", "hicache")
      for module, cls in (("mha", "MHATokenToKVPoolHost"), ("mha", "AsymmetricMHATokenToKVPoolHost"),
                          ("mla", "MLATokenToKVPoolHost"))
      for method, fn, what in (("backup_from_device_all_layer", "_around_backup", "backup"),
                               ("load_to_device_per_layer", "_around_load", "load back"))),
    _cpu("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.__init__", "AFTER",
         "cpu.dp_attention_fix._after_torch_native_init", "torch_native gets the padding rows' "
         "seq_len DP attention asks the CPU engine's backend for (intel_amx's 1)", "dp-attention"),
    _cpu("sglang.srt.distributed.bootstrap._init_cpu_threads_env", "AROUND",
         "cpu.threads_fix._around_init_threads", "torch threads = the rank's bound cores where "
         "SGLang does not bind", "threads"),
    _cpu("sglang.srt.layers.moe.fused_moe_native.moe_forward_native", "AROUND",
         "cpu.moe_fix._around_moe_forward_native", "EP's -1 expert ids add zero; 0-token "
         "batches give an empty output", "native-moe"),
    _cpu(f"{_FP8}.Fp8LinearMethod.process_weights_after_loading", "AROUND", "cpu.fp8_fix._around_process",
         "SGLang's CPU weight processing, with the AMX packing replaced by a marker", "fp8-weights"),
    _cpu(f"{_FP8}.Fp8LinearMethod.apply", "AROUND", "cpu.fp8_fix._around_linear_apply",
         "marked fp8 linear layers: dequantized weight, F.linear (W8A16)", "fp8-weights"),
    _cpu(f"{_FP8}.Fp8MoEMethod.process_weights_after_loading", "AROUND", "cpu.fp8_fix._around_process",
         "the same for fp8 MoE experts", "fp8-weights"),
    _cpu(f"{_FP8}.Fp8MoEMethod.apply", "AROUND", "cpu.fp8_fix._around_moe_apply",
         "marked fp8 MoE: native torch MoE over experts dequantized as routed", "fp8-weights"),
    _cpu(f"{_FP8}.requantize_with_max_scale", "AROUND", "cpu.fp8_fix._around_requantize",
         "per-tensor fp8 fused shards (QKV, gate_up) keep their own scales, one per row, as SGLang "
         "does on sm89-sm100 GPUs, instead of a requantization through a CUDA-only kernel",
         "fp8-weights"),
    _cpu(f"{_CT}.compressed_tensors.CompressedTensorsConfig.get_linear_scheme", "AROUND",
         "cpu.ct_fp8_fix._around_get_linear_scheme", "the scheme a CPU supports, not the CUDA "
         "capability's: SGLang's weight-only fp8 scheme; any other refused by name",
         "ct-fp8-weights"),
    _cpu(f"{_CT_W8A16}.process_weights_after_loading", "AROUND", "cpu.ct_fp8_fix._around_w8a16_process",
         "SGLang's weight processing with the Marlin packing replaced by a marker", "ct-fp8-weights"),
    _cpu(f"{_CT_W8A16}.apply_weights", "AROUND", "cpu.ct_fp8_fix._around_w8a16_apply",
         "marked layers: fp8 weight * per-row scale, F.linear (W8A16)", "ct-fp8-weights"),
    _cpu("sglang.srt.models.deepseek_common.deepseek_weight_loader.block_quant_to_tensor_quant",
         "AROUND", "cpu.fp8_fix._around_kv_b_requant",
         "block-fp8 kv_b_proj (W_UK / W_UV) dequantized to bf16 as SGLang's CUDA branch does, not "
         "requantized per tensor (a second, lossy rounding)", "fp8-weights"),
    _cpu(f"{_FP4_LINEAR}.process_weights_after_loading", "AROUND", "cpu.nvfp4_fix._around_linear_process",
         "NVFP4 linear layers: the checkpoint's packed weights and scales kept as loaded (no "
         "Blackwell / Marlin repacking), the layer marked", "nvfp4-weights"),
    _cpu(f"{_FP4_LINEAR}.apply", "AROUND", "cpu.nvfp4_fix._around_linear_apply",
         "marked NVFP4 linear layers: dequantized weight, F.linear (W4A16)", "nvfp4-weights"),
    _cpu(f"{_FP4_MOE}.__init__", "AROUND", "cpu.nvfp4_fix._around_moe_init",
         "the NVFP4 MoE method is built on the CPU engine (its Blackwell-or-Marlin refusal guards "
         "kernels the CPU path does not call)", "nvfp4-weights"),
    _cpu(f"{_FP4_MOE}.create_moe_runner", "AROUND", "cpu.nvfp4_fix._around_moe_runner",
         "CPU experts: the runner config recorded, no CUDA fp4 runner built", "nvfp4-weights"),
    _cpu("sglang.srt.layers.moe.fused_moe_triton.layer._fuses_routed_scaling_factor_in_topk", "AROUND",
         "cpu.nvfp4_fix._around_fuses_scaling", "CPU NVFP4 experts: routed_scaling_factor not folded "
         "into the top-k weights (SGLang's non-CUDA DeepSeek MoE multiplies after the experts)",
         "nvfp4-weights"),
    _cpu(f"{_FP4_MOE}.process_weights_after_loading", "AROUND", "cpu.nvfp4_fix._around_moe_process",
         "the same for NVFP4 MoE experts", "nvfp4-weights"),
    _cpu(f"{_FP4_MOE}.apply", "AROUND", "cpu.nvfp4_fix._around_moe_apply",
         "marked NVFP4 MoE: native torch MoE over experts dequantized as routed", "nvfp4-weights"),
    _cpu(f"{_SPEC_OPS}.reconstruct_tree.reconstruct_indices_from_tree_mask", "REPLACE",
         "cpu.spec_fix.reconstruct_indices_from_tree_mask", f"draft tree links from its mask. {NO_ORIGINAL}",
         "ngram-spec"),
    _cpu(f"{_SPEC_OPS}.spec_tree.sgl_verify_tree_greedy_cpu", "REPLACE", "cpu.spec_fix.verify_tree_greedy_cpu",
         f"greedy verify of the drafts. {NO_ORIGINAL}", "ngram-spec"),
    _cpu(f"{_SPEC_OPS}.cache_locs.assign_extend_cache_locs_cpu", "REPLACE",
         "cpu.spec_fix.assign_extend_cache_locs_cpu", f"the drafts' cache slots. {NO_ORIGINAL}", "ngram-spec"),
    _cpu("sglang.srt.mem_cache.allocation.assign_req_to_token_pool_cpu", "REPLACE",
         "cpu.spec_fix.assign_req_to_token_pool_cpu", f"req_to_token writes of speculative "
         f"allocation. {NO_ORIGINAL}", "ngram-spec"),
    _cpu(f"{_SPEC_OPS}.eagle.fill_accept_out_cache_loc_cpu", "REPLACE",
         "cpu.spec_fix.fill_accept_out_cache_loc_cpu", f"cache slots of the accepted drafts. {NO_ORIGINAL}",
         "ngram-spec"),
    _cpu("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
         "AROUND", "cpu.spec_fix._around_forward_extend", "TARGET_VERIFY batches attend under the "
         "draft tree's mask; every other batch goes to SGLang", "ngram-spec"),
    _cpu("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup", "REPLACE",
         "cpu.spec_fix.native_kv_move", "the pool moves KV by SGLang's torch branch. REPLACE: "
         "the original's warm-up already calls the tiled sgl-kernel copy op, absent here", "ngram-spec"),
    _cpu("sglang.srt.mem_cache.allocation.get_last_loc", "AROUND", "cpu.spec_fix._around_get_last_loc",
         "CPU tensors take SGLang's torch get_last_loc (its Triton one is picked for \"helix\")",
         "ngram-spec"),
    _cpu(f"{_SPEC_OPS}.spec_tree.sgl_build_tree_kernel_efficient_cpu", "REPLACE",
         "cpu.eagle_fix.build_tree_kernel_efficient_cpu", f"the EAGLE verify tree. {NO_ORIGINAL}", "eagle"),
    _cpu(f"{_SPEC_OPS}.cache_locs.assign_draft_cache_locs_contiguous_cpu", "REPLACE",
         "cpu.eagle_fix.assign_draft_cache_locs_contiguous_cpu", f"the draft steps' cache slots. "
         f"{NO_ORIGINAL}", "eagle"),
    _cpu(f"{_SPEC_OPS}.eagle.fill_bonus_tokens_cpu", "REPLACE", "cpu.eagle_fix.fill_bonus_tokens_cpu",
         f"the target's token after the accepted drafts. {NO_ORIGINAL}", "eagle"),
    _cpu("sglang.srt.models.deepseek_v2.DeepseekV2ForCausalLM.set_embed_and_head", "AROUND",
         "cpu.eagle_fix._around_set_embed_and_head", "the draft shares the target's embedding and "
         "head without CUDA cache / sync calls", "eagle"),
)


def installed_rows(cpu_engine: bool, environ: Mapping[str, str] | None = None) -> tuple[Seam, ...]:
    """The rows a process installs: every always-row, plus on the CPU engine the rows of each
    enabled CPU fix."""
    return tuple(row for row in TABLE if not row.cpu_only
                 or (cpu_engine and cpu_fix(row.cpu_fix).enabled(environ)))


def install(rows: tuple[Seam, ...]) -> None:
    """Register every row's function at its target (idempotent)."""
    for row in rows:
        install_seam(row.kind, row.target, row.function)


def missing(rows: tuple[Seam, ...]) -> list[str]:
    """'KIND target' of every row not live in this process ([] for hooks once apply_hooks() ran)."""
    return [f"{row.kind} {row.target}" for row in rows if not is_live(row.kind, row.target, row.function)]


def rows_of_fix(name: str) -> tuple[Seam, ...]:
    """The rows that carry CPU fix `name` (its hooks)."""
    return tuple(row for row in TABLE if row.cpu_fix == name)


def markdown() -> str:
    """The table as docs/sglang-integration.md lists it: one markdown table per area, then the
    CPU fixes."""
    out = []
    for area, title in AREAS.items():
        out += [f"**{title}**", "", "| target | kind | function | installed | why |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| `{r.target}` | {r.kind} | `{r.owner}.{r.fn}` | {r.when} | {r.why} |"
                for r in TABLE if r.area == area]
        out.append("")
    out += ["**CPU fixes** (`srt/cpu/fixes.py`; each on the CPU engine only)", "",
            "| fix | module | opt out | why |", "| --- | --- | --- | --- |"]
    out += [f"| {f.name} | `cpu/{f.module}.py` | {f'`{f.opt_out_env}=0`' if f.opt_out_env else '-'} "
            f"| {f.why} |" for f in CPU_FIXES]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
