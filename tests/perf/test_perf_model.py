"""Structural properties of the analytic decode model (sglang_helix/perf); pure, no ranks."""

from __future__ import annotations

import numpy as np
import pytest

from sglang_helix.perf import search as P
from sglang_helix.perf.layouts import Layout, LayoutError, check_layout, layouts_for
from sglang_helix.perf.model import Setting, attention_layer_time, helix_exchange_bytes, hopb_overlap, step
from sglang_helix.perf.probe import hardware_from_profile
from sglang_helix.perf.specs import HARDWARE, MODELS, HardwareSpec, ModelSpec, SpecError, get_model

BATCH = np.array([1, 2, 8, 64, 512])
FAKE_CPU = {"version": 1, "host": "test", "cores": 2, "measured_at": "now", "flops_fp32": 5e10,
            "flops_bf16": 1e11, "mem_bw": 2e10, "link_latency": 2e-4, "link_bw": 1e9, "mem_total": 3.2e10}


def _st(model="deepseek-r1", ctx=1 << 20, hw="gb200", prec="fp4", lat=1.0):
    return Setting(get_model(model), HARDWARE[hw], ctx, prec, lat)


def test_param_counts_match_public_sizes():
    expect = {"deepseek-r1": 671e9, "llama-405b": 405e9, "llama-70b": 70.6e9, "qwen3-235b": 235e9, "kimi-k2": 1.03e12}
    for name, total in expect.items():
        assert MODELS[name].total_params == pytest.approx(total, rel=0.02)


def test_specs_validate():
    with pytest.raises(SpecError):
        ModelSpec("x", "x", "A", 2, 8, 6, 4, 8, 10, dense_intermediate=8, num_dense_layers=2)  # 6 % 4
    with pytest.raises(SpecError):
        HardwareSpec("x", {"fp4": 1.0}, 1.0, -1.0, 1.0, 0.0, 8, 1.0, 0.0)
    with pytest.raises(SpecError):
        _st(hw="h100", prec="fp4")


@pytest.mark.parametrize("model,lay", [
    ("deepseek-r1", Layout("helix", kvp=16, tpf=4, ep=4)),
    ("llama-405b", Layout("helix", kvp=8, tpa=8, tpf=64)),
])
def test_helix_exchange_independent_of_context(model, lay):
    short, long = step(_st(model, 1 << 16), lay, BATCH), step(_st(model, 1 << 22), lay, BATCH)
    np.testing.assert_allclose(short.exchange, long.exchange)
    assert helix_exchange_bytes(get_model(model), lay, 4) > 0
    assert (long.kv_read > short.kv_read).all()


@pytest.mark.parametrize("model", ["deepseek-r1", "llama-70b"])
def test_kv_read_scales_one_over_kvp(model):
    tpa = 1 if get_model(model).mla else 8
    t1 = step(_st(model), Layout("helix", kvp=1, tpa=tpa, tpf=tpa), BATCH).kv_read
    for kvp in (2, 4, 8):
        t = step(_st(model), Layout("helix", kvp=kvp, tpa=tpa, tpf=kvp * tpa), BATCH).kv_read
        np.testing.assert_allclose(t, t1 / kvp, rtol=1e-12)


def test_hopb_pipeline_formula_never_slower_without_latency():
    rng = np.random.default_rng(0)
    a, x = rng.uniform(0, 1, 1000), rng.uniform(0, 1, 1000)
    for s in (2, 4, 8):
        assert (hopb_overlap(a, 0.0, x, s) <= a + x + 1e-12).all()
    assert hopb_overlap(3.0, 0.5, 1.0, 1) == pytest.approx(4.5)


@pytest.mark.parametrize("model", ["deepseek-r1", "llama-405b"])
def test_hopb_choice_never_slower_than_off(model):
    st = _st(model)
    sw = P.sweep(st, layouts_for(st.model, 64, ("helix",)), P.batch_grid(1024))
    best = {}
    for i in range(len(sw.ttl)):
        lay = sw.layout(i)
        key = (lay.kvp, lay.tpa, lay.tpf, lay.ep, sw.batch[i])
        best[key] = min(best.get(key, np.inf), sw.ttl[i])
        assert best[key] <= sw.hopb_off_ttl[i] * (1 + 1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_helix_kvp1_equals_tp_for_attention(n):
    st = _st("llama-70b", 1 << 17, "h100", "fp8")
    helix = step(st, Layout("helix", kvp=1, tpa=n, tpf=n), BATCH)
    tp = step(st, Layout("tp", tpa=n, tpf=n), BATCH)
    np.testing.assert_allclose(helix.attention, tp.attention)
    np.testing.assert_allclose(helix.ttl, tp.ttl)


def test_tp_duplicates_kv_beyond_kv_heads():
    st = _st("llama-405b")
    tp64 = step(st, Layout("tp", tpa=64, tpf=64), BATCH)
    helix = step(st, Layout("helix", kvp=8, tpa=8, tpf=64), BATCH)
    np.testing.assert_allclose(tp64.kv_bytes, 8 * helix.kv_bytes)


def test_feasibility_rejects_what_does_not_fit():
    st = _st("llama-405b", 1 << 20, "h100", "fp8")
    one = step(st, Layout("tp", tpa=1, tpf=1), np.array([1]))
    assert not one.feasible.any()  # 405 GB of fp8 weights on one 80 GB GPU
    assert one.weights_bytes > st.hw.usable_memory
    big = step(st, Layout("helix", kvp=8, tpa=8, tpf=64), np.array([1, 100000]))
    assert big.feasible.tolist() == [True, False]


def test_layout_rules():
    with pytest.raises(LayoutError):
        check_layout(get_model("llama-70b"), Layout("helix", kvp=1, tpa=16, tpf=16))  # TPA > K
    with pytest.raises(LayoutError):
        Layout("tp", tpa=4, tpf=2)  # FFN group must be the attention group
    assert all(lay.gpus == 64 for lay in layouts_for(get_model("deepseek-r1"), 64))


def test_sweep_covers_every_layout_and_batch():
    st = _st()
    layouts = [lay for g in range(1, 65) for lay in layouts_for(st.model, g)]
    batches = P.batch_grid(8192, 8)
    sw = P.sweep(st, layouts, batches)
    assert sw.evaluated == len(layouts) * len(batches) > 50_000


def test_pareto_is_monotone():
    sw = P.sweep(_st(), layouts_for(get_model("deepseek-r1"), 16), P.batch_grid(512))
    f = P.pareto(sw)
    assert (np.diff(sw.tok_s_user[f]) < 0).all() and (np.diff(sw.tok_s_gpu[f]) > 0).all()


def test_cpu_profile_attention_time():
    hw = hardware_from_profile(FAKE_CPU)
    st = Setting(get_model("deepseek-r1"), hw, 8192, "bf16")
    one = attention_layer_time(st, Layout("helix", kvp=1, tpf=1), 1)
    two = attention_layer_time(st, Layout("helix", kvp=2, tpf=2), 1)
    flops = 2 * 8192 * 128 * (576 + 512)
    assert one["attn"] == pytest.approx(flops / 5e10)  # fp32 compute-bound on CPU
    assert two["attn"] == pytest.approx(one["attn"] / 2) and two["exchange"] > 2e-4


@pytest.mark.parametrize("text,value", [("64K", 65536), ("1M", 1048576), ("1048576", 1048576), ("128k", 131072)])
def test_parse_context(text, value):
    assert P.parse_context(text) == value


def test_mla_value_exchange_moves_dv_and_holds_replicated_w_uv():
    """--helix-mla-exchange value: the a2a carries v_head_dim (128) instead of kv_lora_rank (512)
    per head; W_UV (H x R x Dv) is held on every GPU instead of 1/N of it; GQA and baselines are
    untouched."""
    spec, lay = get_model("deepseek-r1"), Layout("helix", kvp=2, tpf=2)
    latent = helix_exchange_bytes(spec, lay, 1, "latent")
    value = helix_exchange_bytes(spec, lay, 1, "value")
    assert (latent, value) == (128 * (512 * 2 + 4) / 2, 128 * (128 * 2 + 4) / 2)  # 65,792 / 16,640
    big = Layout("helix", kvp=8, tpf=8)
    st_l, st_v = _st(), Setting(get_model("deepseek-r1"), HARDWARE["gb200"], 1 << 20, "fp4",
                                1.0, "value")
    res_l, res_v = step(st_l, big, BATCH), step(st_v, big, BATCH)
    assert (res_v.exchange < res_l.exchange).all()
    w_uv = spec.num_heads * spec.kv_lora_rank * spec.v_head_dim * spec.num_layers
    assert res_v.weights_bytes - res_l.weights_bytes == pytest.approx(w_uv * (1 - 1 / 8) * 0.5)
    for model, other in (("llama-405b", Layout("helix", kvp=8, tpa=8, tpf=64)),
                         ("deepseek-r1", Layout("tp", tpa=8, tpf=8))):
        st_a = Setting(get_model(model), HARDWARE["gb200"], 1 << 20, "fp4")
        st_b = Setting(get_model(model), HARDWARE["gb200"], 1 << 20, "fp4", 1.0, "value")
        np.testing.assert_array_equal(step(st_a, other, BATCH).ttl, step(st_b, other, BATCH).ttl)
    with pytest.raises(ValueError, match="mla_exchange"):
        Setting(spec, HARDWARE["gb200"], 8, "fp4", 1.0, "values")


def test_cpu_profile_attention_time_with_w_uv():
    hw = hardware_from_profile(FAKE_CPU)
    lay = Layout("helix", kvp=2, tpf=2)
    lat = attention_layer_time(Setting(get_model("deepseek-r1"), hw, 8192, "bf16"), lay, 1, w_uv=True)
    val = attention_layer_time(Setting(get_model("deepseek-r1"), hw, 8192, "bf16", 1.0, "value"),
                               lay, 1, w_uv=True)
    assert val["w_uv"] == pytest.approx(2 * lat["w_uv"])  # all H heads vs H/2, same roofline side
    assert val["exchange"] < lat["exchange"] and val["attn"] == lat["attn"]
