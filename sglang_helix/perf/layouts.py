"""Parallel layouts of one decode instance, and their enumeration for a model and GPU count.

Kinds (G GPUs = kvp * tpa * dpa * pp):

- ``tp``    attention TP over all G (KV heads duplicated once TP > K; MLA's latent KV on every
            rank); FFN TP (x EP for MoE) over G.
- ``pp``    TP (x EP) inside each of `pp` pipeline stages; the batch runs as `pp` micro-batches.
- ``ep``    data-parallel attention (dpa groups of TP tpa) + MoE experts spread over G (EP x TP);
            dense FFN layers TP over G behind an all-gather / reduce-scatter.
- ``kvp``   Medha-style KV parallelism: sequence sharded kvp ways x TP tpa heads; the partials are
            combined with an fp32 all-reduce and the FFN stays TP-tied to the tpa attention ranks
            (replicated across the kvp groups).
- ``helix`` KVP x TPA attention (TPA <= K, no KV duplication), one all-to-all, then the same
            N = KVP x TPA GPUs run the FFN as TP (dense) or TP x EP (MoE); HOP-B slices.
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import ModelSpec
from ..errors import HelixError

KINDS = ("tp", "pp", "ep", "kvp", "helix")
BASELINE_KINDS = ("tp", "pp", "ep", "kvp")
HOPB_CHOICES = (1, 2, 4, 8)


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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"kind {self.kind!r} unknown; choose one of {', '.join(KINDS)}")
        for name in ("kvp", "tpa", "dpa", "tpf", "ep", "pp", "hopb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be an int >= 1, got {value!r}")
        if self.ffn_group != self.ffn_group_expected:
            raise LayoutError(
                f"{self.kind}: tpf x ep = {self.ffn_group} must equal {self.ffn_group_expected}"
            )
        if self.hopb > 1 and self.kind != "helix":
            raise LayoutError("HOP-B slices apply to helix layouts only")

    @property
    def attn_group(self) -> int:
        """GPUs of one pipeline stage (all of them run attention)."""
        return self.kvp * self.tpa * self.dpa

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

    def label(self) -> str:
        """Short human-readable form, e.g. 'helix KVP8xTPA1 | TP4xEP16 | HOP-B 2'."""
        ffn = f"TP{self.tpf}" + (f"xEP{self.ep}" if self.ep > 1 else "")
        if self.kind == "helix":
            hop = f" | HOP-B {self.hopb}" if self.hopb > 1 else ""
            return f"helix KVP{self.kvp}xTPA{self.tpa} | {ffn}{hop}"
        if self.kind == "kvp":
            return f"kvp KVP{self.kvp}xTP{self.tpa} | {ffn} (tied)"
        if self.kind == "ep":
            return f"ep DP{self.dpa}xTP{self.tpa} | {ffn}"
        if self.kind == "pp":
            return f"pp PP{self.pp} | TP{self.tpa} | {ffn}"
        return f"tp TP{self.tpa} | {ffn}"


def check_layout(model: ModelSpec, lay: Layout) -> None:
    """LayoutError if `lay` cannot run `model` (head / expert divisibility, Helix rules)."""
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ffn_splits(model: ModelSpec, group: int) -> list[tuple[int, int]]:
    """(tpf, ep) with tpf * ep = group; ep > 1 only for MoE with experts divisible by ep."""
    out = []
    for ep in _divisors(group):
        if ep == 1 or (model.is_moe and model.num_experts % ep == 0):
            out.append((group // ep, ep))
    return out


def _valid(model: ModelSpec, lay: Layout) -> bool:
    try:
        check_layout(model, lay)
    except LayoutError:
        return False
    return True


def layouts_for(model: ModelSpec, gpus: int, kinds: tuple[str, ...] = KINDS) -> list[Layout]:
    """Every valid layout of `kinds` using exactly `gpus` GPUs."""
    out: list[Layout] = []
    for kind in kinds:
        out += [lay for lay in _candidates(model, gpus, kind) if _valid(model, lay)]
    return out


def _candidates(model: ModelSpec, g: int, kind: str):
    if kind == "tp":
        for tpf, ep in _ffn_splits(model, g):
            yield Layout("tp", tpa=g, tpf=tpf, ep=ep)
    elif kind == "pp":
        for pp in _divisors(g)[1:]:
            for tpf, ep in _ffn_splits(model, g // pp):
                yield Layout("pp", tpa=g // pp, tpf=tpf, ep=ep, pp=pp)
    elif kind == "ep":
        for dpa in _divisors(g)[1:]:
            for tpf, ep in _ffn_splits(model, g):
                yield Layout("ep", tpa=g // dpa, dpa=dpa, tpf=tpf, ep=ep)
    elif kind == "kvp":
        for kvp in _divisors(g)[1:]:
            for tpf, ep in _ffn_splits(model, g // kvp):
                yield Layout("kvp", kvp=kvp, tpa=g // kvp, tpf=tpf, ep=ep)
    elif kind == "helix":
        for tpa in _divisors(g):
            for tpf, ep in _ffn_splits(model, g):
                for hopb in HOPB_CHOICES if g // tpa > 1 else (1,):
                    yield Layout("helix", kvp=g // tpa, tpa=tpa, tpf=tpf, ep=ep, hopb=hopb)


def all_layouts(model: ModelSpec, max_gpus: int, kinds: tuple[str, ...] = KINDS) -> list[Layout]:
    """Layouts for every GPU count 1..max_gpus."""
    return [lay for g in range(1, max_gpus + 1) for lay in layouts_for(model, g, kinds)]
