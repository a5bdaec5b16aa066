"""Helix partial-attention exchange backends, selected by name with `make_exchange`.

Every KVP rank of a group holds partials (out [B, Hl, Dv], lse [B, Hl] fp32 natural log) for the
same Hl heads, each over its own slice of the KV sequence. After the exchange, KVP rank d owns head
slice d ([d*Hl/KVP, (d+1)*Hl/KVP)) merged over all KVP shards: out [B, Hl/KVP, Dv] in out's dtype.
The backends take any float out dtype; Helix's decode and extend hand them partials in
`partial_dtype(cfg.exchange_dtype, activation)`: fp32 by default (the merged result is rounded to
the activation dtype once, docs/math.md section 4; itemsize below is 4), or the activation dtype
with --helix-exchange-dtype activation (itemsize 2 on bf16 models).

    ex = make_exchange("a2a", group, kvp)
    pending = ex.start(out, lse)   # launches communication (async where the backend allows)
    ...                            # HOP-B: compute the next batch slice here
    pending.wait()                 # communication complete
    merged = pending.merge()       # [B, Hl/KVP, Dv]
    merged = ex(out, lse)          # the same, in one call

Backends (bytes per rank are what leaves the rank, i.e. sent to OTHER ranks; S never appears):
  a2a     one all_to_all_single of out and LSE packed together as [KVP(dest), B, Hl/KVP,
          Dv + 4/itemsize] in out's dtype, the fp32 LSE bit-cast into the 4/itemsize trailing
          slots (1 for fp32, 2 for bf16/fp16) so it stays exact fp32:
          B * Hl * (Dv * itemsize + 4) * (KVP - 1) / KVP bytes.
          (design.md's "(Dv + 1) elements" assumes an LSE in the activation dtype; bf16 has
          8 mantissa bits, too few for an LSE, so this costs one extra bf16 slot per head.)
  ag_rs   SGLang/vLLM baseline: all-gather LSE (fp32), rescale, reduce-scatter fp32 outputs:
          B * Hl * 4 * (KVP - 1)  +  B * Hl * Dv * 4 * (KVP - 1) / KVP bytes.
  nvshmem CUDA symmetric memory (torch.distributed._symmetric_memory), same payload as a2a.
With KVP == 1 no backend communicates (group may be None): the merge runs over one partial.

`group` is the KVP process group of this rank (its group rank must equal its KVP rank); the ops
take it as an argument, there is no global state.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import merge_partials
from .errors import HelixError

EXCHANGE_BACKENDS = ("a2a", "ag_rs", "nvshmem")

# Same-size integer dtypes: the LSE bits are copied through integer views so that no float
# load/store can touch them (a bf16 pair of slots holding fp32 bits may look like a NaN).
_INT_OF_ITEMSIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}

# Newer torch names the tensor collectives *_single; torch 2.8 only has the *_tensor names.
_all_gather_1 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_1 = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class HelixCommError(HelixError):
    """The exchange cannot run with these inputs / this setup; the message says what to change."""


@dataclass
class ExchangeStats:
    """bytes_sent: bytes handed to torch.distributed for OTHER ranks; calls: exchanges started."""

    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls = 0


def partial_dtype(exchange_dtype: str, activation: torch.dtype) -> torch.dtype:
    """The dtype partial outputs travel in: fp32, or the model's `activation` dtype
    (HelixConfig.exchange_dtype "fp32" / "activation")."""
    if exchange_dtype == "fp32":
        return torch.float32
    if exchange_dtype == "activation":
        return activation
    raise HelixCommError(f"exchange_dtype {exchange_dtype!r}: choose fp32 or activation "
                         "(--helix-exchange-dtype)")


def lse_slots(dtype: torch.dtype) -> int:
    """Slots of `dtype` that hold one fp32 LSE bit-for-bit (1 fp32, 2 bf16/fp16, 4 fp8)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize not in _INT_OF_ITEMSIZE:
        raise HelixCommError(f"out dtype {dtype} ({itemsize} bytes) cannot carry an fp32 LSE")
    return 4 // itemsize


def a2a_bytes_per_rank(batch: int, heads: int, head_dim: int, itemsize: int, kvp: int) -> int:
    """Bytes one rank sends in the a2a backend: B * Hl * (Dv*itemsize + 4) * (KVP-1) / KVP."""
    return batch * heads * (head_dim * itemsize + 4) * (kvp - 1) // kvp


def check_exchange_inputs(out: torch.Tensor, lse: torch.Tensor, kvp: int) -> None:
    """Validate out [B, Hl, Dv] and lse [B, Hl] fp32 for an exchange over `kvp` ranks."""
    if out.dim() != 3:
        raise HelixCommError(f"out must be [B, Hl, Dv], got shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise HelixCommError(f"out must be a floating tensor, got {out.dtype}")
    if lse.shape != out.shape[:2]:
        raise HelixCommError(
            f"lse must be [B, Hl] = {tuple(out.shape[:2])} to match out, got {tuple(lse.shape)}"
        )
    if lse.dtype != torch.float32:
        raise HelixCommError(f"lse must be fp32 (natural-log LSE), got {lse.dtype}")
    if out.shape[1] % kvp:
        raise HelixCommError(
            f"Hl={out.shape[1]} heads are not divisible by KVP={kvp}: each KVP rank receives "
            f"Hl/KVP heads"
        )
    if not (out.is_contiguous() and lse.is_contiguous()):
        raise HelixCommError("out and lse must be contiguous (call .contiguous() first)")
    if out.device != lse.device:
        raise HelixCommError(f"out on {out.device} but lse on {lse.device}")
    lse_slots(out.dtype)


class PendingExchange:
    """An exchange in flight. wait() completes communication; merge() -> [B, Hl/KVP, Dv]."""

    def __init__(self, finish, out_dtype: torch.dtype, merge=merge_partials):
        self._finish = finish  # () -> (outs [S, B, Hs, Dv], lses [S, B, Hs]) or the merged out
        self._out_dtype = out_dtype
        self._merge = merge
        self._partials = None
        self._merged = None

    def wait(self) -> None:
        """Block until this rank's received data is complete (idempotent)."""
        if self._partials is None and self._merged is None:
            result = self._finish()
            if isinstance(result, tuple):
                self._partials = result
            else:  # reduced in flight (ag_rs, fp32): hand back out's dtype like the others
                self._merged = result.to(self._out_dtype)

    def partials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Received partials: outs [KVP(src), B, Hl/KVP, Dv], lses [KVP, B, Hl/KVP] fp32.

        Only for backends that move partials (a2a, nvshmem, local); ag_rs reduces in flight.
        """
        self.wait()
        if self._partials is None:
            raise HelixCommError("this backend reduces in flight; it has no per-rank partials")
        return self._partials

    def merge(self) -> torch.Tensor:
        """LSE-weighted merge of the received partials: [B, Hl/KVP, Dv] in out's dtype."""
        self.wait()
        if self._merged is None:
            outs, lses = self._partials
            self._merged = self._merge(outs, lses)[0].to(self._out_dtype)
        return self._merged


class HelixExchange:
    """Base class: validation, stats and `ex(out, lse)`; subclasses implement `_launch`.
    merge(outs, lses) -> (out, lse): the LSE merge of received partials (HelixAttention binds its
    KernelPath's; default attention.merge_partials, resolved per call)."""

    name = "base"

    def __init__(self, group, kvp: int, merge=merge_partials):
        self.group = group
        self.kvp = kvp
        self.merge = merge
        self.stats = ExchangeStats()

    def start(self, out: torch.Tensor, lse: torch.Tensor) -> PendingExchange:
        """Launch the exchange of out [B, Hl, Dv] and lse [B, Hl] fp32; see the module doc."""
        check_exchange_inputs(out, lse, self.kvp)
        self.stats.calls += 1
        return PendingExchange(self._launch(out, lse), out.dtype, self.merge)

    def __call__(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """start + wait + merge: [B, Hl, Dv], [B, Hl] -> [B, Hl/KVP, Dv]."""
        return self.start(out, lse).merge()

    def _launch(self, out, lse):
        raise NotImplementedError


class LocalExchange(HelixExchange):
    """KVP == 1: nothing to send; the merge runs over one partial (so dtypes/shapes match)."""

    name = "local"

    def _launch(self, out, lse):
        return lambda: (out.unsqueeze(0), lse.unsqueeze(0))


def _pack(out: torch.Tensor, lse: torch.Tensor, kvp: int) -> torch.Tensor:
    """out [B, Hl, Dv], lse [B, Hl] fp32 -> send [KVP(dest), B, Hl/KVP, Dv + slots] in out.dtype.

    send[d, b, h, :Dv] = out[b, d*Hs + h]; send[d, b, h, Dv:] = the 4 bytes of lse[b, d*Hs + h].
    """
    bsz, heads, dv = out.shape
    hs, slots = heads // kvp, lse_slots(out.dtype)
    send = torch.empty(kvp, bsz, hs, dv + slots, dtype=out.dtype, device=out.device)
    send[..., :dv] = out.view(bsz, kvp, hs, dv).transpose(0, 1)
    int_dtype = _INT_OF_ITEMSIZE[out.element_size()]
    lse_bits = lse.view(bsz, kvp, hs).transpose(0, 1).contiguous().view(int_dtype)
    send.view(lse_bits.dtype)[..., dv:] = lse_bits.view(kvp, bsz, hs, slots)
    return send


def _unpack(recv: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """recv [KVP(src), B, Hs, Dv + slots] -> outs view [KVP, B, Hs, Dv], lses [KVP, B, Hs] fp32."""
    kvp, bsz, hs, _ = recv.shape
    lse_bits = recv.view(_INT_OF_ITEMSIZE[recv.element_size()])[..., dv:].contiguous()
    return recv[..., :dv], lse_bits.view(torch.int32).view(torch.float32).view(kvp, bsz, hs)


class A2AExchange(HelixExchange):
    """One all_to_all_single per call carrying out and the bit-cast fp32 LSE (module doc)."""

    name = "a2a"

    def _launch(self, out, lse):
        send = _pack(out, lse, self.kvp)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        # send[d] for d != self rank leaves the rank: (KVP-1)/KVP of the packed buffer.
        self.stats.bytes_sent += send[0].numel() * send.element_size() * (self.kvp - 1)
        dv = out.shape[-1]

        def finish():
            work.wait()
            return _unpack(recv, dv)

        return finish


class AGRSExchange(HelixExchange):
    """Baseline: all-gather LSE, rescale own out in fp32, reduce-scatter (sum) over heads.

    Only the all-gather overlaps with HOP-B compute: the reduce-scatter needs its result, so it
    runs inside wait(). gloo has reduce_scatter only in the concatenation form (dim 0), so the
    input is laid out [KVP(dest) * B, Hs, Dv].
    """

    name = "ag_rs"

    def _launch(self, out, lse):
        bsz, heads, dv = out.shape
        lse_all = torch.empty(self.kvp * bsz, heads, dtype=torch.float32, device=lse.device)
        work = _all_gather_1(lse_all, lse, group=self.group, async_op=True)
        self.stats.bytes_sent += lse.numel() * 4 * (self.kvp - 1)

        def finish():
            work.wait()
            return self._rescale_reduce_scatter(out, lse, lse_all.view(self.kvp, bsz, heads))

        return finish

    def _rescale_reduce_scatter(self, out, lse, lse_all) -> torch.Tensor:
        """out [B, Hl, Dv] * exp(lse - lse_total) summed over ranks -> [B, Hs, Dv] fp32."""
        bsz, heads, dv = out.shape
        hs = heads // self.kvp
        total = torch.logsumexp(lse_all, dim=0)  # [B, Hl]
        # all -inf (no token anywhere) cannot happen for a real request; keep it NaN-free anyway.
        total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
        scaled = out.float() * torch.exp(lse - total).unsqueeze(-1)
        send = scaled.view(bsz, self.kvp, hs, dv).transpose(0, 1).reshape(self.kvp * bsz, hs, dv)
        recv = torch.empty(bsz, hs, dv, dtype=torch.float32, device=out.device)
        _reduce_scatter_1(recv, send, group=self.group)
        self.stats.bytes_sent += send.numel() * 4 * (self.kvp - 1) // self.kvp
        return recv


class NVSHMEMExchange(HelixExchange):
    """a2a payload through CUDA symmetric memory (torch.distributed._symmetric_memory).

    Each rank packs [KVP(dest), B, Hs, Dv + slots] into its symmetric buffer, a barrier publishes
    it, then every rank pulls its chunk from each peer's buffer (get_buffer maps the peer's
    memory) and a second barrier lets peers reuse their buffer. The buffer is allocated and
    rendezvoused once per capacity (a collective: all ranks see the same B, so they agree).

    NOT VERIFIED: developed on a CPU-only machine; no test here runs it on a GPU. The CPU-side
    behaviour (a clear error) is tested.
    """

    name = "nvshmem"

    def __init__(self, group, kvp: int, merge=merge_partials):
        super().__init__(group, kvp, merge)
        _require_cuda_symm_mem()
        import torch.distributed._symmetric_memory as symm_mem

        self._symm_mem = symm_mem
        self._buf = None
        self._handle = None

    def _launch(self, out, lse):
        if not out.is_cuda:
            raise HelixCommError(_nvshmem_message(f"got a {out.device} tensor"))
        send = _pack(out, lse, self.kvp)
        symm = self._symmetric_view(send)
        symm.copy_(send)
        me = self._handle.rank
        self._handle.barrier(channel=0)
        recv = torch.empty_like(send)
        for peer in range(self.kvp):
            peer_buf = self._handle.get_buffer(peer, tuple(send.shape), send.dtype)
            recv[peer].copy_(peer_buf[me])
        self._handle.barrier(channel=0)
        self.stats.bytes_sent += send[0].numel() * send.element_size() * (self.kvp - 1)
        dv = out.shape[-1]
        return lambda: _unpack(recv, dv)

    def _symmetric_view(self, send: torch.Tensor) -> torch.Tensor:
        """A view of this rank's symmetric buffer shaped like `send` (re-rendezvous to grow)."""
        nbytes = send.numel() * send.element_size()
        if self._buf is None or self._buf.numel() < nbytes:
            if hasattr(self._symm_mem, "enable_symm_mem_for_group"):  # required by older torch
                self._symm_mem.enable_symm_mem_for_group(self.group.group_name)
            self._buf = self._symm_mem.empty(nbytes, dtype=torch.uint8, device=send.device)
            self._handle = self._symm_mem.rendezvous(self._buf, self.group)
        return self._buf[:nbytes].view(send.dtype).view(send.shape)


def _nvshmem_message(why: str) -> str:
    return (
        f"comm_backend='nvshmem' (--helix-comm-backend nvshmem) needs CUDA tensors and torch "
        f"symmetric memory ({why}); use comm_backend='a2a' (one all_to_all_single) or 'ag_rs' "
        f"on this machine"
    )


def _require_cuda_symm_mem() -> None:
    if not torch.cuda.is_available():
        raise HelixCommError(_nvshmem_message("CUDA is not available"))
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise HelixCommError(_nvshmem_message(f"import failed: {exc}")) from exc


_BACKENDS = {"a2a": A2AExchange, "ag_rs": AGRSExchange, "nvshmem": NVSHMEMExchange}


def make_exchange(name: str, group, kvp: int, *, merge=merge_partials) -> HelixExchange:
    """The exchange backend `name` for a KVP group of size `kvp` (LocalExchange when kvp == 1);
    merge: the LSE merge of the received partials (HelixExchange)."""
    if name not in _BACKENDS:
        raise HelixCommError(
            f"comm_backend={name!r} is unknown; choose one of {', '.join(EXCHANGE_BACKENDS)} "
            f"(--helix-comm-backend)"
        )
    if isinstance(kvp, bool) or not isinstance(kvp, int) or kvp < 1:
        raise HelixCommError(f"kvp must be an int >= 1, got {kvp!r}")
    if kvp == 1:
        return LocalExchange(group, 1, merge)
    if name == "nvshmem":  # the most useful error first: on CPU no group setup can fix this
        _require_cuda_symm_mem()
    if group is None:
        raise HelixCommError(f"kvp={kvp} needs the KVP process group of this rank, got None")
    size = dist.get_world_size(group)
    if size != kvp:
        raise HelixCommError(f"the KVP group has {size} ranks but kvp={kvp}")
    return _BACKENDS[name](group, kvp, merge)


def create_kvp_groups(cfg, rank: int, group_factory=None, *, attention_groups: int = 1,
                      attention_group: int = 0):
    """Create every TPA group's KVP process group (collective: call on all ranks, same order).

    cfg: a HelixConfig; rank: this rank's attention rank g (0..N-1). The default group holds
    `attention_groups` attention-TP groups of N consecutive global ranks each (SGLang's layout:
    PP stages x DP-attention groups; 1 without them), this rank in `attention_group`; each one is
    its own Helix group. In attention group a, TPA group t's KVP group holds global ranks
    a*N + cfg.kvp_group_ranks(t) = a*N + [t*KVP, ..., t*KVP + KVP-1], so group rank == KVP rank.
    Returns this rank's group (None when KVP == 1: no exchange). group_factory: defaults to
    torch.distributed.new_group (ranks are global ranks of the default group).
    """
    if cfg.kvp == 1:
        return None
    if not 0 <= attention_group < attention_groups:
        raise HelixCommError(f"attention group {attention_group} outside [0, {attention_groups})")
    factory = group_factory or dist.new_group
    mine = None
    for a in range(attention_groups):
        for tpa_rank in range(cfg.tpa):
            group = factory(ranks=[a * cfg.world_size + g for g in cfg.kvp_group_ranks(tpa_rank)])
            if (a, tpa_rank) == (attention_group, cfg.tpa_rank(rank)):
                mine = group
    return mine
