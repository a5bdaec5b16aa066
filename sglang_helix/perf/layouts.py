"""Parallel layouts of one decode instance, and their enumeration per family.

Families (G GPUs per pipeline stage; T = tensor-parallel size):

- ``tp``    plain TP: attention heads over T (KV heads duplicated once T > K; MLA's latent on
            every rank); FFN TP (x EP) over T.
- ``pp``    TP (x EP) inside each of `pp` pipeline stages; the batch runs as `pp` micro-batches.
- ``dpa``   DP attention (SGLang --attn-dp-size): `dpa` groups of attention TP `tpa`, each with
            its own requests; FFN over all G (MoE EP x TP; dense TP behind AG / RS).
- ``kvp``   Medha-style KV parallelism (the Helix paper's baseline): sequence `kvp` ways x TP `tpa`
            heads, fp32 all-reduce of the partials, FFN TP-tied to the `tpa` ranks.
- ``dcp``   decode context parallelism inside TP (SGLang --dcp-size, or vLLM's): KV interleaved by
            token over `kvp` = DCP ranks of the T = `tpa` TP ranks; the query all-gathered over the
            DCP group (or, MLA with a2a, projected replicated: `qrep`); partials combined by
            `xback` (a2a, ag_rs, fi_a2a); o_proj and FFN TP (x EP) over T.
- ``helix`` KVP x TPA attention (TPA <= K, no KV duplication, Q projected on every KVP rank),
            one exchange (`xback`), then the same N = KVP x TPA GPUs run o_proj and the FFN as TP
            (x EP); HOP-B slices; MLA exchanges latents or values (`mla_x`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HelixError
from .specs import ModelSpec

KINDS = ("tp", "pp", "dpa", "kvp", "dcp", "helix")
HOPB_CHOICES = (1, 2, 4, 8)
ENGINES = ("sglang", "vllm")
X_BACKENDS = ("-", "a2a", "ag_rs", "fi_a2a")


class LayoutError(HelixError, ValueError):
    """A layout that cannot run the model; the message names the rule."""


@dataclass(frozen=True)
class Layout:
    """One decode-instance layout; see the module docstring for the kinds."""

    kind: str
    kvp: int = 1
    tpa: int = 1
    dpa: int = 1
    tpf: int = 1
    ep: int = 1
    pp: int = 1
    hopb: int = 1
    xback: str = "-"
    qrep: bool = False
    mla_x: str = "latent"
    engine: str = "sglang"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"kind {self.kind!r} unknown; choose one of {', '.join(KINDS)}")
        for name in ("kvp", "tpa", "dpa", "tpf", "ep", "pp", "hopb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be an int >= 1, got {value!r}")
        if self.ffn_group != self.ffn_group_expected:
            raise LayoutError(f"{self.kind}: tpf x ep = {self.ffn_group} must equal {self.ffn_group_expected}")
        if self.hopb > 1 and self.kind != "helix":
            raise LayoutError("HOP-B slices apply to helix layouts only")
        if self.xback == "-" and self.kind in ("dcp", "helix"):
            object.__setattr__(self, "xback", "a2a")  # the default exchange of both
        if self.xback not in X_BACKENDS or (self.xback != "-") != (self.kind in ("dcp", "helix")):
            raise LayoutError(f"{self.kind}: exchange backend {self.xback!r} (dcp / helix only)")
        if self.kind == "dcp" and (self.kvp < 2 or self.tpa % self.kvp):
            raise LayoutError(f"DCP {self.kvp} must be > 1 and divide TP {self.tpa}")
        if self.engine not in ENGINES or (self.engine == "vllm" and self.kind != "dcp"):
            raise LayoutError(f"engine {self.engine!r}: sglang, or vllm for dcp layouts")
        if self.qrep and not (self.kind == "dcp" and self.xback in ("a2a", "fi_a2a")):
            raise LayoutError("a replicated q projection is a DCP a2a / fi_a2a option")
        if self.mla_x not in ("latent", "value") or (self.mla_x == "value" and self.kind != "helix"):
            raise LayoutError(f"MLA exchange {self.mla_x!r}: latent, or value for helix layouts")

    @property
    def attn_group(self) -> int:
        """GPUs of one pipeline stage (all of them run attention)."""
        return self.tpa if self.kind == "dcp" else self.kvp * self.tpa * self.dpa

    @property
    def gpus(self) -> int:
        return self.attn_group * self.pp

    @property
    def ffn_group(self) -> int:
        return self.tpf * self.ep

    @property
    def ffn_group_expected(self) -> int:
        return self.tpa if self.kind == "kvp" else self.attn_group

    @property
    def out_split(self) -> int:
        """Ways o_proj is split by heads: N for Helix (H/N heads per rank after the exchange)."""
        return self.kvp * self.tpa if self.kind == "helix" else self.tpa

    @property
    def seq_split(self) -> int:
        """Ways one request's KV is split by sequence (KVP, Medha KVP or DCP)."""
        return self.kvp

    def label(self) -> str:
        """Short human-readable form, e.g. 'helix KVP8xTPA1 | FFN TP4xEP16 | HOP-B 2'."""
        ffn = f"FFN TP{self.tpf}" + (f"xEP{self.ep}" if self.ep > 1 else "")
        if self.kind == "helix":
            extra = (f" | HOP-B {self.hopb}" if self.hopb > 1 else "") + (" | value" if self.mla_x == "value" else "")
            return f"helix KVP{self.kvp}xTPA{self.tpa} | {ffn}{extra}"
        if self.kind == "dcp":
            prefix = "vLLM " if self.engine == "vllm" else ""
            q = " qrep" if self.qrep else ""
            return f"{prefix}dcp TP{self.tpa} DCP{self.kvp} {self.xback}{q} | {ffn}"
        if self.kind == "kvp":
            return f"kvp KVP{self.kvp}xTP{self.tpa} | {ffn} (tied)"
        if self.kind == "dpa":
            return f"dp-attn DP{self.dpa}xTP{self.tpa} | {ffn}"
        if self.kind == "pp":
            return f"pp PP{self.pp} TP{self.tpa} | {ffn}"
        return f"tp TP{self.tpa} | {ffn}"


def check_layout(model: ModelSpec, lay: Layout) -> None:
    """LayoutError if `lay` cannot run `model` (head / expert divisibility, family rules)."""
    if model.num_heads % lay.tpa:
        raise LayoutError(f"TP {lay.tpa} does not divide {model.num_heads} heads")
    if lay.ep > 1 and (not model.is_moe or model.num_experts % lay.ep):
        raise LayoutError(f"EP {lay.ep} needs an MoE model with experts divisible by it")
    if lay.pp > model.num_layers:
        raise LayoutError(f"PP {lay.pp} > {model.num_layers} layers")
    if lay.kind == "helix":
        if lay.tpa > model.num_kv_heads or model.num_kv_heads % lay.tpa:
            raise LayoutError(f"Helix TPA {lay.tpa} must divide the {model.num_kv_heads} KV heads")
        if model.num_heads % lay.out_split:
            raise LayoutError(f"Helix N = {lay.out_split} must divide {model.num_heads} heads")
        if lay.mla_x == "value" and not model.mla:
            raise LayoutError("the value exchange is an MLA option")
    if lay.kind == "dcp":
        _check_dcp(model, lay)


def _check_dcp(model: ModelSpec, lay: Layout) -> None:
    """DCP shards only what TP duplicates: MLA up to T; GQA while the T/DCP head groups still
    cover the K KV heads ((T / K) % DCP == 0: SGLang's and vLLM's rule); q replication is MLA."""
    if not model.mla:
        t, k = lay.tpa, model.num_kv_heads
        if t % k or (t // k) % lay.kvp:
            raise LayoutError(f"GQA DCP {lay.kvp} at TP {t} needs (TP / {k} KV heads) % DCP == 0")
        if lay.qrep or lay.xback == "fi_a2a" or (lay.engine == "sglang" and lay.xback != "a2a"):
            raise LayoutError("SGLang's GQA DCP decode (triton) always all-gathers q and all-reduces")
    if lay.engine == "vllm" and (lay.xback == "fi_a2a" or lay.qrep):
        raise LayoutError("vLLM DCP: ag_rs or a2a, query all-gathered")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ffn_splits(model: ModelSpec, group: int) -> list[tuple[int, int]]:
    """(tpf, ep) with tpf * ep = group; ep > 1 only for MoE with experts divisible by ep."""
    return [(group // ep, ep) for ep in _divisors(group)
            if ep == 1 or (model.is_moe and model.num_experts % ep == 0)]


def _valid(model: ModelSpec, lay: Layout) -> bool:
    try:
        check_layout(model, lay)
    except LayoutError:
        return False
    return True


def layouts_for(model: ModelSpec, gpus: int, kinds: tuple[str, ...] = KINDS,
                fi_a2a: bool = False) -> list[Layout]:
    """Every valid layout of `kinds` using exactly `gpus` GPUs (fi_a2a: the chip has FlashInfer's
    MNNVL all-to-all, Blackwell)."""
    out: list[Layout] = []
    for kind in kinds:
        out += [lay for lay in _FAMILIES[kind](model, gpus, fi_a2a) if _valid(model, lay)]
    return out


def _tp(model, g, _fi):
    for tpf, ep in _ffn_splits(model, g):
        yield Layout("tp", tpa=g, tpf=tpf, ep=ep)


def _pp(model, g, _fi):
    for pp in _divisors(g)[1:]:
        for tpf, ep in _ffn_splits(model, g // pp):
            yield Layout("pp", tpa=g // pp, tpf=tpf, ep=ep, pp=pp)


def _dpa(model, g, _fi):
    for dpa in _divisors(g)[1:]:
        for tpf, ep in _ffn_splits(model, g):
            yield Layout("dpa", tpa=g // dpa, dpa=dpa, tpf=tpf, ep=ep)


def _kvp(model, g, _fi):
    for kvp in _divisors(g)[1:]:
        for tpf, ep in _ffn_splits(model, g // kvp):
            yield Layout("kvp", kvp=kvp, tpa=g // kvp, tpf=tpf, ep=ep)


def _dcp(model, g, fi_a2a):
    exchanges = [("a2a", False)]
    if model.mla:
        exchanges = [("a2a", False), ("a2a", True), ("ag_rs", False)]
        exchanges += [("fi_a2a", False), ("fi_a2a", True)] if fi_a2a else []
    for dcp in _divisors(g)[1:]:
        for tpf, ep in _ffn_splits(model, g):
            for xback, qrep in exchanges:
                yield Layout("dcp", kvp=dcp, tpa=g, tpf=tpf, ep=ep, xback=xback, qrep=qrep)


def _helix(model, g, _fi):
    modes = ("latent", "value") if model.mla else ("latent",)
    for tpa in _divisors(g):
        for tpf, ep in _ffn_splits(model, g):
            for hopb in HOPB_CHOICES if g // tpa > 1 else (1,):
                for mode in modes if g // tpa > 1 else ("latent",):
                    yield Layout("helix", kvp=g // tpa, tpa=tpa, tpf=tpf, ep=ep, hopb=hopb, xback="a2a",
                                 mla_x=mode)


_FAMILIES = {"tp": _tp, "pp": _pp, "dpa": _dpa, "kvp": _kvp, "dcp": _dcp, "helix": _helix}


def vllm_dcp(lay: Layout, xback: str = "ag_rs") -> Layout:
    """The vLLM DCP layout of an SGLang one (query all-gathered, ag_rs by default)."""
    return Layout("dcp", kvp=lay.kvp, tpa=lay.tpa, tpf=lay.tpf, ep=lay.ep, xback=xback, engine="vllm")


def all_layouts(model: ModelSpec, max_gpus: int, kinds: tuple[str, ...] = KINDS,
                fi_a2a: bool = False) -> list[Layout]:
    """Layouts for every GPU count 1..max_gpus."""
    return [lay for g in range(1, max_gpus + 1) for lay in layouts_for(model, g, kinds, fi_a2a)]
