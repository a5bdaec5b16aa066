"""sglang_helix.srt.models.gqa without a server: attention re-shaping (one generic hook for the
Llama, Qwen2 and Qwen3 attention classes), CPU head-padding undo, pass-through when Helix is off,
hook registration and liveness."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
from helpers import NEEDS_SGLANG

from sglang_helix.srt import state
from sglang_helix.srt.models import gqa as sm
from sglang_helix.rules.model import GQA_ARCHITECTURES
from sglang_helix.config import HelixConfig

needs_sglang = NEEDS_SGLANG


def _attn(h=8, k=2, d=16, tp=2):
    radix = SimpleNamespace(tp_q_head_num=h // tp, tp_k_head_num=max(1, k // tp),
                            tp_v_head_num=max(1, k // tp), quant_method=None)
    return SimpleNamespace(total_num_heads=h, total_num_kv_heads=k, head_dim=d, hidden_size=64,
                           num_heads=h // tp, num_kv_heads=max(1, k // tp), q_size=0, kv_size=0,
                           qkv_proj="stock", attn=radix)


def test_apply_helix_heads_kvp1_keeps_stock_qkv_and_sets_tpa_heads():
    layout = HelixConfig(kvp=1, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    attn = _attn()
    sm.apply_helix_heads(attn, layout, bias=False, quant_config=None, qkv_prefix="x.qkv_proj")
    assert attn.qkv_proj == "stock"  # TP = N = TPA already shards QKV TPA ways
    assert (attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size) == (4, 1, 64, 16)
    assert (attn.attn.tp_q_head_num, attn.attn.tp_k_head_num, attn.attn.tp_v_head_num) == (4, 1, 1)


def test_apply_helix_heads_kvp2_rebuilds_qkv_tpa_ways(monkeypatch):
    layout = HelixConfig(kvp=2, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    built = []
    monkeypatch.setattr(sm, "_tpa_qkv", lambda attn, lay, bias, qc, prefix: built.append((lay.kvp, prefix)) or "tpa")
    attn = _attn(tp=4)
    sm.apply_helix_heads(attn, layout, bias=False, quant_config=None, qkv_prefix="m.qkv_proj")
    assert attn.qkv_proj == "tpa" and built == [(2, "m.qkv_proj")]
    assert (attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size) == (4, 1, 64, 16)


def test_apply_helix_heads_refuses_mismatched_heads_keeps_kv_scales():
    layout = HelixConfig(kvp=1, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    with pytest.raises(sm.HelixModelError, match="H=16"):
        sm.apply_helix_heads(_attn(h=16, k=4), layout, bias=False, quant_config=None, qkv_prefix="")
    attn = _attn()
    method = attn.attn.quant_method = object()  # an fp8 checkpoint's Fp8KVCacheMethod (k/v scales)
    sm.apply_helix_heads(attn, layout, bias=False, quant_config=None, qkv_prefix="")
    assert attn.attn.quant_method is method and attn.attn.tp_q_head_num == 4


def test_hooked_classes_are_exactly_the_validated_architectures():
    from sglang_helix.srt.hook_table import TABLE

    archs = [a for cls in sm.GQA_ATTENTION_CLASSES for a in cls.architectures]
    assert len(archs) == len(set(archs)) and set(archs) == GQA_ARCHITECTURES
    rows = [r for r in TABLE if r.owner == "models.gqa" and r.fn == "_around_gqa_attention_init"]
    hooked = {r.target.removesuffix(".__init__").rsplit(".", 1)[1] for r in rows}
    assert hooked == {c.name for c in sm.GQA_ATTENTION_CLASSES} == {
        "LlamaAttention", "Qwen2Attention", "Qwen3Attention"}
    assert all(r.kind == "AROUND" and r.target.endswith(".__init__") for r in rows)


def test_stock_qkv_group():
    assert sm.stock_qkv_group(SimpleNamespace(parallel_group=None)) == "tp"  # Llama, Qwen2
    assert sm.stock_qkv_group(SimpleNamespace(parallel_group="attn_tp")) == "attn_tp"  # Qwen3
    with pytest.raises(sm.HelixModelError, match="parallel_group='replicated'.*--enable-helix"):
        sm.stock_qkv_group(SimpleNamespace(parallel_group="replicated"))


@pytest.mark.parametrize("stock_group, bias", [(None, False), (None, True), ("attn_tp", False)])
def test_tpa_qkv_replicates_the_stock_group_kvp_ways(monkeypatch, stock_group, bias):
    """The rebuilt QKV keeps the stock layer's group ("attn_tp" for Qwen3), bias and prefix."""
    fake = ModuleType("sglang.srt.layers.linear")
    fake.ReplicatedParallelGroup = lambda group, replicas: (group, replicas)
    fake.QKVParallelLinear = lambda *args, **kw: SimpleNamespace(args=args, **kw)
    monkeypatch.setitem(sys.modules, "sglang.srt.layers.linear", fake)
    layout = HelixConfig(kvp=2, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    attn = _attn(tp=4)
    attn.qkv_proj = SimpleNamespace(parallel_group=stock_group)
    qkv = sm._tpa_qkv(attn, layout, bias, "qc", "p.qkv_proj")
    assert qkv.args == (64, 16, 8, 2) and (qkv.bias, qkv.quant_config, qkv.prefix) == (bias, "qc", "p.qkv_proj")
    assert qkv.parallel_group == (stock_group or "tp", 2)


def _llama_like_init(self, config, layer_id=0, quant_config=None, prefix="", bias=False):
    _fill_stock(self, bias)


def _qwen2_like_init(self, hidden_size, num_heads, num_kv_heads, head_dim=None, layer_id=0,
                     quant_config=None, dual_chunk_attention_config=None, prefix=""):
    _fill_stock(self, True)


def _qwen3_like_init(self, hidden_size, num_heads, num_kv_heads, layer_id=0, quant_config=None,
                     rms_norm_eps=None, attention_bias=False, prefix="", alt_stream=None):
    _fill_stock(self, attention_bias)


def _fill_stock(self, bias):
    stock = _attn(tp=4)
    stock.qkv_proj = SimpleNamespace(bias=object() if bias else None, parallel_group=None)
    self.__dict__.update(stock.__dict__)


@pytest.mark.parametrize("init, args, kwargs, bias", [
    (_llama_like_init, ("cfg", 3, "qc"), {"prefix": "model.layers.3.self_attn"}, False),
    (_qwen2_like_init, (64, 8, 2, 16, 3, "qc"), {"prefix": "model.layers.3.self_attn"}, True),
    (_qwen3_like_init, (64, 8, 2), {"layer_id": 3, "quant_config": "qc", "attention_bias": True,
                                    "prefix": "model.layers.3.self_attn"}, True),
])
def test_one_hook_reshapes_every_class_signature(monkeypatch, init, args, kwargs, bias):
    """quant_config / prefix are found by name whatever the class's signature; bias comes from
    the stock qkv_proj; heads become H/TPA, K/TPA."""
    layout = HelixConfig(kvp=2, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    monkeypatch.setattr(state, "current_config", lambda: layout)
    monkeypatch.setattr(state, "_RUNTIME", None)
    built = []
    monkeypatch.setattr(sm, "_tpa_qkv", lambda attn, lay, b, qc, prefix: built.append((b, qc, prefix)) or "tpa")
    attn = SimpleNamespace()
    sm._around_gqa_attention_init(init, attn, *args, **kwargs)
    assert built == [(bias, "qc", "model.layers.3.self_attn.qkv_proj")] and attn.qkv_proj == "tpa"
    assert (attn.num_heads, attn.num_kv_heads, attn.attn.tp_q_head_num, attn.attn.tp_k_head_num) == (4, 1, 4, 1)


def test_init_hook_passes_through_without_helix(monkeypatch):
    monkeypatch.setattr(state, "current_config", lambda: None)
    calls = []
    sm._around_gqa_attention_init(lambda self, *a, **k: calls.append((a, k)), SimpleNamespace(), 1, x=2)
    assert calls == [((1,), {"x": 2})]
    cfg = SimpleNamespace(num_attention_heads=16, num_key_value_heads=4)
    assert sm._around_unaligned_cpu_tp(lambda c, *a: c, cfg, None, 4) is cfg
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 4)


def test_cpu_head_padding_is_undone_under_helix(monkeypatch):
    layout = HelixConfig(kvp=2, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    monkeypatch.setattr(state, "current_config", lambda: layout)
    hf = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
    mc = SimpleNamespace(num_attention_heads=8, hf_config=hf, hf_text_config=hf)

    def pad(c, load_config, tp):  # what SGLang's CPU engine does for K % TP != 0
        for o in (c, c.hf_config):
            o.num_attention_heads, o.num_key_value_heads = 16, 4
        c.hf_config.intermediate_size = 132
        return c

    out = sm._around_unaligned_cpu_tp(pad, mc, None, 4)
    assert (out.num_attention_heads, out.num_key_value_heads) == (8, 2)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size) == (8, 2, 132)


def test_init_runtime_once(monkeypatch):
    monkeypatch.setattr(state, "_RUNTIME", None)
    layout = HelixConfig(kvp=2, tpa=2, num_heads=8, num_kv_heads=2, page_size=4)
    made = []
    rt = state.init_runtime(layout, 3, group_factory=lambda ranks: made.append(ranks) or tuple(ranks))
    assert made == [[0, 1], [2, 3]] and rt.kvp_group == (2, 3) and state.runtime() is rt
    with pytest.raises(state.HelixRuntimeError, match="already"):
        state.init_runtime(layout, 3, group_factory=lambda ranks: None)


@pytest.mark.parametrize("attn_tp, attn_rank, world, rank, groups", [
    (4, 3, 4, 3, (1, 0)),  # TP 4
    (2, 1, 4, 3, (2, 1)),  # DP attention 2 x attention TP 2 (or PP 2 x TP 2): second group
    (2, 0, 8, 6, (4, 3)),  # PP 2 x DP attention 2 x attention TP 2
])
def test_attention_group_of_sglangs_layout(attn_tp, attn_rank, world, rank, groups):
    assert state.attention_group_of(attn_tp, attn_rank, world, rank, attn_tp) == groups


def test_attention_group_of_refuses_other_layouts():
    with pytest.raises(state.HelixRuntimeError, match="attention TP size 2 .* != Helix KVP x TPA = 4"):
        state.attention_group_of(2, 0, 4, 0, 4)
    with pytest.raises(state.HelixRuntimeError, match="not SGLang's layout"):
        state.attention_group_of(2, 0, 4, 1, 2)


SGLANG_CHECKS = {
    "models: the GQA init hooks bind quant_config and prefix by name": """
import inspect, pkgutil
from sglang_helix.srt.hook_table import TABLE
from sglang_helix.srt.hooks import target_wraps
from sglang_helix.srt.models.gqa import _around_gqa_attention_init
rows = [r for r in TABLE if r.fn == "_around_gqa_attention_init"]
assert len(rows) == 3 and all(target_wraps(r.target, _around_gqa_attention_init) for r in rows)
for row in rows:  # the stock __init__ the generic hook binds by name
    init = inspect.unwrap(pkgutil.resolve_name(row.target))
    assert {"quant_config", "prefix"} <= set(inspect.signature(init).parameters), row.target
import sglang.srt.models.mistral as mi, sglang.srt.models.llama as ll
assert issubclass(mi.MistralForCausalLM, ll.LlamaForCausalLM)  # same LlamaAttention
""",
    "state: the hook covers bootstrap's own binding": """
import sglang.srt.distributed.bootstrap as b, sglang.srt.distributed.parallel_state as ps
assert b.initialize_model_parallel is ps.initialize_model_parallel
from sglang_helix.srt.state import bootstrap_binding_live
assert bootstrap_binding_live()
""",
}


@needs_sglang
def test_model_hooks_apply_to_sglangs_attention_classes(sglang_checks):
    sglang_checks.assert_ok("models: the GQA init hooks bind quant_config and prefix by name")


@needs_sglang
def test_state_hook_covers_bootstrap_binding(sglang_checks):
    sglang_checks.assert_ok("state: the hook covers bootstrap's own binding")
