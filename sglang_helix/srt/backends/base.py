"""What the GQA and MLA "helix" attention backends share: construction, per-batch planning, extend.

A backend of global attention rank g holds this rank's Helix KV pool (srt.memory.pools), its
`KernelPath` (core `kernel_path`: decode, merge and extend kernels resolved once, when the backend
is built, from the device, the model and pool dtypes, the pool's dims and whether CUDA graphs
capture decode), a `HelixAttention` for decode (core `decode`) and plans each batch once in
`init_forward_metadata`: decode -> this rank's local page table and lengths in preallocated
buffers; extend -> an `ExtendPlan` (host lengths + local prefix page table); speculative
TARGET_VERIFY batches and draft-tree decode steps -> srt.backends.spec_plans. Layers only run
kernels: decode = partial + exchange + merge (HOP-B slices when configured); extend = core
`extend.helix_extend` (one algorithm for GQA and MLA).

FP8 KV (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): the pool stores fp8 pages in SGLang's per-tensor
scale convention (kernels/kv_quant.py; the layer's k_scale / v_scale, 1 without a KV quant
method); the kernels upcast them tile by tile with those scales; a chunk's own new K/V go through
the same fp8 rounding as the pages they are stored in (as SGLang's torch_native backend reads
them back from its pool); partials are exchanged in fp32 (rounded to the activation dtype once,
after the merge) or, with --helix-exchange-dtype activation, in the activation dtype; LSEs in fp32.

The KVP group and rank come from srt.state.runtime() (created collectively right after SGLang's
initialize_model_parallel); the constructor runs no collective.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from ...comm import partial_dtype
from ...config import HelixConfig, HelixConfigError
from ...decode import HelixAttention
from ...extend import helix_extend
from ...kernel_path import KernelInputs, resolve_kernel_path
from ...kernels import kv_quant
from ...metadata import ExtendPlan, plan_extend
from .. import state
from ..memory.pools import HelixPoolError
from . import spec_plans

BACKEND_NAME = "helix"
# Padded rows of a captured batch get seq_len 1: valid on every rank (the owner of page 0 attends
# one token, the others return an empty partial: out 0, lse -inf).
GRAPH_SEQ_LEN_FILL = 1

logger = logging.getLogger(__name__)


def _attention_backend_base():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


class HelixBackendBase(_attention_backend_base()):
    """Shared part of HelixGQABackend and HelixMLABackend.

    model_runner: needs .device, .dtype (the activations'), .req_to_token_pool (.req_to_token
        [reqs, ctx]), .token_to_kv_pool (this backend's Helix pool class), .server_args (carrying
        the HelixConfig, srt.state.CONFIG_ATTR) and .model_config.context_len.
    rank: global attention rank g (default: the Helix runtime's, else SGLang's attn_tp_rank);
    kvp_group: this rank's KVP group (default: the runtime's); impl: the kernel request resolved
    into `self.kernels` (sglang_helix.kernel_path; "auto" in a server).
    Subclasses set `mla` and `pool_type()` and implement `kernel_inputs`, `_extend_inputs` and
    `forward_decode`.
    """

    mla = False
    # Tokens a decode forward attends beyond forward_batch.seq_lens: step s of a multi-step chain
    # draft decodes position seq_len + s of the same batch (srt.spec sets s + 1 on its backends).
    decode_len_offset = 0

    def __init__(self, model_runner: Any, *, rank: Optional[int] = None, kvp_group=None,
                 impl: str = "auto", draft_tree: Optional[spec_plans.DraftTreeStep] = None):
        super().__init__()
        self.cfg = self._config_of(model_runner)
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = self._pool_of(model_runner)
        self.rank, group = rank_and_group(self.cfg, rank, kvp_group)
        if self.cfg.kvp_rank(self.rank) != self.pool.kvp_rank:
            raise HelixPoolError(f"pool holds KVP rank {self.pool.kvp_rank} but rank {self.rank} is "
                                 f"KVP rank {self.cfg.kvp_rank(self.rank)}")
        # a draft-tree step decodes top-k rows per request (srt.backends.spec_plans)
        self.draft_tree = draft_tree
        rows, extra = (draft_tree.topk, draft_tree.extra_pages) if draft_tree else (1, 0)
        max_pages = math.ceil(model_runner.model_config.context_len / self.cfg.page_size)
        self.kernels = resolve_kernel_path(impl, self.device, mla=self.mla, cuda_graphs=decode_graphs(self.device),
                                           inputs=self.kernel_inputs(model_runner.dtype))
        logger.info("sglang_helix: %s backend kernels %s", "MLA" if self.mla else "GQA", self.kernels.describe())
        self.helix = HelixAttention(
            self.cfg, self.rank, group, max_batch=self.req_to_token_pool.req_to_token.shape[0] * rows,
            max_local_pages=max(1, math.ceil(max_pages / self.cfg.kvp)) + extra, kernels=self.kernels,
            device=self.device)
        self._planned = None  # the ForwardBatch the current metadata was planned for
        self.extend_plan: Optional[ExtendPlan] = None
        self._mixed_seen = False  # a mixed batch was logged (_note_mixed)

    @classmethod
    def pool_type(cls) -> type:
        raise NotImplementedError

    def kernel_inputs(self, q_dtype: torch.dtype) -> KernelInputs:
        """The dtypes and dims the kernel path is resolved for (queries in q_dtype, this pool)."""
        raise NotImplementedError

    def _config_of(self, model_runner: Any) -> HelixConfig:
        cfg = state.config_of(model_runner.server_args)
        kind = "an MLA" if self.mla else "a GQA"
        if cfg is None or cfg.mla != self.mla:
            raise HelixConfigError(f"--attention-backend {BACKEND_NAME} needs --enable-helix with "
                                   f"{kind} model (no matching HelixConfig on ServerArgs)")
        return cfg

    def _pool_of(self, model_runner: Any):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, self.pool_type()):
            raise HelixPoolError(f"the {BACKEND_NAME} backend needs a {self.pool_type().__name__}, "
                                 f"got {type(pool).__name__}: the plugin's pool hooks are not live "
                                 f"(sglang_helix.srt.plugin.register())")
        return pool

    # ---- plan (once per batch) -------------------------------------------------

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Decode: local page table + lengths for all layers. Extend: the ExtendPlan. Idle (a
        rank with no batch this step): nothing to plan."""
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.extend_plan, self._planned = None, forward_batch
            return
        if mode.is_decode():
            self.extend_plan = None
            self._plan_decode(forward_batch)
        else:
            self.extend_plan = self._plan_batch(forward_batch)
            self._planned = forward_batch

    def _plan_batch(self, forward_batch: Any) -> ExtendPlan:
        """The ExtendPlan of an extend or a speculative TARGET_VERIFY batch."""
        if forward_batch.forward_mode.is_target_verify():
            return self._plan_verify(forward_batch)
        return self._plan_extend(forward_batch)

    def _plan_verify(self, forward_batch: Any) -> ExtendPlan:
        """TARGET_VERIFY: an extend over the committed tokens, causal for chains, under the tree
        mask for draft trees (srt.backends.spec_plans)."""
        return spec_plans.plan_verify(self, forward_batch)

    def _plan_decode(self, forward_batch: Any) -> None:
        if self.draft_tree is not None:  # a draft-tree step: branch tables by page colour
            spec_plans.plan_tree_step(self, forward_batch, self.draft_tree)
            self._planned = forward_batch
            return
        seq_lens = forward_batch.seq_lens
        if self.decode_len_offset:
            seq_lens = seq_lens + self.decode_len_offset
        table, _ = self._local_tables(forward_batch, seq_lens)
        self.helix.plan(seq_lens, table)
        self._planned = forward_batch  # held, so its id cannot be recycled while it counts

    def _plan_extend(self, forward_batch: Any) -> ExtendPlan:
        """An extend batch, a mixed one included (--enable-mixed-chunk: SGLang runs it as EXTEND,
        each decode row a 1-token extend over its seq_len - 1 cached tokens, so its prefix is
        attended page-sharded like a chunk's, in the batch's one exchange)."""
        prefix = forward_batch.extend_prefix_lens_cpu
        longest = max((int(n) for n in prefix), default=0) if prefix is not None else 0
        plan = plan_extend(
            forward_batch.extend_seq_lens_cpu, prefix,
            self.cfg.kvp_rank(self.rank), self.cfg.page_size, self.cfg.kvp,
            local_tables=lambda lens: self._local_tables(forward_batch, lens.to(self.device), longest))
        self._note_mixed(plan)
        return plan

    def _note_mixed(self, plan: ExtendPlan) -> None:
        """Count batches holding decode-shaped rows (1 token over a cached prefix) beside chunk
        rows, mixed chunks (/server_info helix.mixed_batches), and log the first one."""
        tails = sum(1 for n, p in zip(plan.extend_lens, plan.prefix_lens) if n == 1 and p > 0)
        if not 0 < tails < len(plan.extend_lens):
            return
        rt = state.runtime()
        if rt is not None:
            rt.mixed_batches += 1
        if not self._mixed_seen:
            self._mixed_seen = True
            logger.info("sglang_helix: mixed batch: %d decode rows (1-token extends over their "
                        "KV-sharded prefix) + %d chunk rows, one exchange", tails,
                        len(plan.extend_lens) - tails)

    def _local_tables(self, forward_batch: Any, lens: torch.Tensor, longest: Optional[int] = None):
        """This rank's local page table for lengths `lens` [B]; `longest`: their max as a host int
        when the caller has it (else read from the device once, at plan time)."""
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        if longest is None:
            longest = int(lens.max()) if lens.numel() else 0
        pages = max(1, -(-longest // self.cfg.page_size))
        return self.pool.local_decode_tables(rows, lens, max_pages=pages)

    def _decode_ready(self, forward_batch: Any) -> None:
        if self._planned is not forward_batch or self.extend_plan is not None:  # not planned by a wrapper
            self.extend_plan = None
            self._plan_decode(forward_batch)

    # ---- CUDA graphs (decode) ----------------------------------------------------
    # SGLang plans through init_forward_metadata_out_graph outside the graph (at capture and
    # before every replay), then records / replays the layers. The plan writes into buffers
    # allocated once (HelixDecodeMetadata), and the layers read their fixed-width views with
    # static-grid kernels and no host sync, so a replay sees the new batch's metadata.

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Check the preallocated decode buffers hold the largest graph batch and that the decode
        kernel was resolved capturable (Triton: a static grid; the library wrappers plan on the
        host per call), as it is wherever SGLang's decode graphs were on when it was built."""
        if max_bs > self.helix.meta.max_batch:
            raise HelixConfigError(
                f"CUDA graph batch {max_bs} > the {self.helix.meta.max_batch} requests the Helix "
                f"decode buffers hold (the request pool); lower --cuda-graph-max-bs to "
                f"{self.helix.meta.max_batch}")
        if torch.device(self.device).type == "cuda" and not self.kernels.capturable:
            raise HelixConfigError(
                f"decode CUDA graphs cannot capture the helix backend's kernels {self.kernels.describe()}: "
                f"it was built while decode CUDA graphs were off (--cuda-graph-backend-decode=disabled); "
                f"build it after SGLang publishes its graph config, or keep decode graphs off")

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Host-side planning for capture, replay and eager runs alike."""
        self.init_forward_metadata(forward_batch)

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        """Nothing to record: the layers read the buffers the out-of-graph plan filled."""
        return None

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return GRAPH_SEQ_LEN_FILL

    def get_cpu_graph_seq_len_fill_value(self) -> int:
        """DP attention pads a batch's rows to a multiple of the attention TP size on the CPU
        engine too (ForwardBatch._pad_inputs_to_size): the same valid fill as for graphs."""
        return GRAPH_SEQ_LEN_FILL

    # ---- run -------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """The chunk's rows: q [T, Hq * D], k/v of the new tokens -> [T, H/N * Dv] (q's dtype).

        Causal attention over the chunk for this rank's H/N heads, LSE-merged with every KVP
        rank's partial over its pages of the cached prefix (core extend.helix_extend).
        """
        if self.extend_plan is None or self._planned is not forward_batch:  # not planned by a wrapper
            self.extend_plan, self._planned = self._plan_batch(forward_batch), forward_batch
        plan = self.extend_plan
        if save_kv_cache and k is not None:
            self._store(k, v, layer, forward_batch)
        q3, k_new, v_new, k_pages, v_pages = self._extend_inputs(q, k, v, layer)
        rows = plan.starts[-1]
        if q3.shape[0] > rows:  # DP attention padded the rows (no request): they attend nothing
            return self._padded(self._extend(q3[:rows], k_new[:rows], v_new[:rows], plan, k_pages,
                                             v_pages, layer, kwargs), q3.shape[0])
        return self._extend(q3, k_new, v_new, plan, k_pages, v_pages, layer, kwargs)

    def _extend(self, q3, k_new, v_new, plan, k_pages, v_pages, layer, kwargs):
        """helix_extend of the plan's rows -> [T, H/N * Dv]."""
        k_scale, v_scale = self.kv_scales(layer)
        out = helix_extend(q3, k_new, v_new, plan, k_pages, v_pages, layer.scaling,
                           kvp_rank=self.cfg.kvp_rank(self.rank),
                           heads_per_rank=self.cfg.heads_per_rank, exchange=self.helix.exchange,
                           w_uv=self._value_projection(kwargs), kernels=self.kernels,
                           k_scale=k_scale, v_scale=v_scale,
                           partial_dtype=partial_dtype(self.cfg.exchange_dtype, q3.dtype))
        return out.reshape(out.shape[0], -1)

    @staticmethod
    def _padded(out: torch.Tensor, rows: int) -> torch.Tensor:
        """out [T', X] with zero rows appended up to `rows` (the padding rows' attention output)."""
        return torch.cat([out, out.new_zeros(rows - out.shape[0], out.shape[1])])

    def _store(self, k, v, layer, forward_batch) -> None:
        self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v,
                                getattr(layer, "k_scale", None), getattr(layer, "v_scale", None))

    @property
    def fp8_kv(self) -> bool:
        """The pool holds fp8 pages (--kv-cache-dtype fp8_e4m3 / fp8_e5m2)."""
        return kv_quant.is_fp8(self.pool.dtype)

    def kv_scales(self, layer) -> tuple[float, float]:
        """(k_scale, v_scale) the kernels read this layer's pages with: for fp8 pages the layer's
        per-tensor scales as host floats (SGLang's k_scale_float / v_scale_float; 1 where the
        layer has no KV quant method); 1 for pages in the activation dtype (stored unscaled)."""
        if not self.fp8_kv:
            return 1.0, 1.0
        return (getattr(layer, "k_scale_float", None) or 1.0, getattr(layer, "v_scale_float", None) or 1.0)

    def _as_stored(self, x, scale):
        """The chunk's new K/V rounded as the pool stores them (fp8 pages; else x itself)."""
        return kv_quant.quantize(x, self.pool.dtype, scale) if self.fp8_kv else x

    def _value_projection(self, kwargs) -> Optional[torch.Tensor]:
        """The per-head value projection applied before the exchange (MLA --helix-mla-exchange
        value: W_UV of all heads, srt.backends.mla); None for GQA."""
        return None

    def _extend_inputs(self, q, k, v, layer):
        """(q [T, Hq, D], k_new [T, Hk, D], v_new [T, Hk, Dv], k_pages, v_pages)."""
        raise NotImplementedError

    def support_triton(self):
        return False


def decode_graphs(device) -> bool:
    """SGLang captures decode in CUDA graphs on `device` (its published graph config; a config not
    published yet counts as on, so the kernel path stays capturable)."""
    if torch.device(device).type != "cuda":
        return False
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend

    return not check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED)


def rank_and_group(cfg: HelixConfig, rank: Optional[int], kvp_group):
    """(global attention rank, KVP group): explicit arguments win, else the Helix runtime."""
    rt = state.runtime()
    if rank is None:
        rank = rt.rank if rt is not None else state.attn_rank()
    if kvp_group is None and cfg.kvp > 1:
        if rt is None:
            raise HelixConfigError(
                f"the {BACKEND_NAME} backend needs its KVP group, created right after SGLang's "
                "initialize_model_parallel by the plugin's state hook (is it live? it is "
                "installed by sglang_helix.srt.plugin.register())")
        kvp_group = rt.kvp_group
    return rank, kvp_group
