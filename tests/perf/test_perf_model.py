"""Structural properties of the analytic decode model (sglang_helix/perf); pure, no ranks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sglang_helix import kv_size
from sglang_helix.perf import memory
from sglang_helix.perf import search as P
from sglang_helix.perf.attention import attended_heads, exchange, kv_elems, kv_ranks
from sglang_helix.perf.collectives import hopb_overlap
from sglang_helix.perf.hardware import HARDWARE, HardwareSpec
from sglang_helix.perf.launch import launch
from sglang_helix.perf.layouts import KINDS, Layout, LayoutError, check_layout, layouts_for, vllm_dcp
from sglang_helix.perf.model import Setting, attention_layer_time, step
from sglang_helix.perf.probe import hardware_from_profile
from sglang_helix.perf.specs import MODELS, ModelSpec, SpecError, get_model

BATCH = np.array([1, 2, 8, 64, 512])
FAKE_CPU = {"version": 1, "host": "test", "cores": 2, "measured_at": "now", "flops_fp32": 5e10,
            "flops_bf16": 1e11, "mem_bw": 2e10, "link_latency": 2e-4, "link_bw": 1e9, "mem_total": 3.2e10}
# One layout of every family per model on 64 GPUs (DCP of GQA models within TP / K).
FAMILY_LAYOUTS = {
    "deepseek-r1": [Layout("tp", tpa=64, tpf=8, ep=8), Layout("dpa", tpa=1, dpa=64, tpf=1, ep=64),
                    Layout("kvp", kvp=8, tpa=8, tpf=8), Layout("pp", tpa=16, pp=4, tpf=16),
                    Layout("dcp", kvp=64, tpa=64, tpf=8, ep=8, xback="a2a", qrep=True),
                    Layout("dcp", kvp=16, tpa=64, tpf=64, xback="ag_rs"),
                    Layout("helix", kvp=64, tpa=1, tpf=8, ep=8, hopb=4),
                    Layout("helix", kvp=64, tpa=1, tpf=64, mla_x="value")],
    "llama-405b": [Layout("tp", tpa=64, tpf=64), Layout("dpa", tpa=8, dpa=8, tpf=64),
                   Layout("dcp", kvp=8, tpa=64, tpf=64), Layout("helix", kvp=8, tpa=8, tpf=64, hopb=2)],
}


def _st(model="deepseek-r1", ctx=1 << 20, hw="gb200", weights="fp4", kv="fp8", **kw):
    return Setting(get_model(model), HARDWARE[hw], ctx, weights, kv, **kw)


def test_param_counts_match_public_sizes():
    expect = {"deepseek-r1": 671e9, "llama-405b": 405e9, "llama-70b": 70.6e9, "qwen3-235b": 235e9,
              "kimi-k2": 1.03e12, "qwen3.5-397b": 397e9}
    for name, total in expect.items():
        assert MODELS[name].total_params == pytest.approx(total, rel=0.02), name


def test_specs_validate():
    with pytest.raises(SpecError):
        ModelSpec("x", "x", "A", 2, 8, 6, 4, 8, 10, dense_intermediate=8, num_dense_layers=2)  # 6 % 4
    with pytest.raises(SpecError):
        HardwareSpec("x", {"fp4": 1.0}, 1.0, -1.0, 1.0, 0.0, 8, 1.0, 0.0)
    with pytest.raises(SpecError, match="no fp4 compute"):
        _st(hw="h100", weights="fp4")
    for hw in HARDWARE.values():  # every datasheet figure names where it comes from
        assert hw.sources and all(s.startswith("https://") for s in hw.sources)
    assert "fp4" not in HARDWARE["h100"].flops and HARDWARE["gb300"].flops["fp4"] > HARDWARE["gb200"].flops["fp4"]


@pytest.mark.parametrize("model", sorted(FAMILY_LAYOUTS))
def test_every_family_is_monotonic_in_context(model):
    """Longer histories never make a step faster, and only the KV-dependent parts grow."""
    for lay in FAMILY_LAYOUTS[model]:
        check_layout(get_model(model), lay)
        runs = [step(_st(model, ctx), lay, BATCH) for ctx in (1 << 14, 1 << 17, 1 << 20)]
        for short, long in zip(runs, runs[1:]):
            assert (long.ttl >= short.ttl).all() and (long.kv_read > short.kv_read).all(), lay.label()
            assert (long.kv_bytes > short.kv_bytes).all(), lay.label()
            np.testing.assert_allclose(long.exchange, short.exchange)  # no S in any exchange
            assert long.weights_bytes == short.weights_bytes


@pytest.mark.parametrize("model", sorted(FAMILY_LAYOUTS))
def test_kv_bytes_come_from_kv_size(model):
    """Resident KV per GPU = requests x kv_size.request_bytes_per_rank of the layout's pages."""
    st = _st(model, 100_000)
    spec = st.model
    for lay in FAMILY_LAYOUTS[model]:
        assert kv_elems(spec, lay) == spec.kv_shape.elems_per_token(kv_ranks(lay))
        row = spec.kv_shape.bytes_per_token(1, kv_ranks(lay))
        if lay.kind == "dcp":  # widened P x DCP pages, P tokens of each on every rank
            page = memory.page_size(spec, lay)
            want = kv_size.request_bytes_per_rank(st.context, page * lay.kvp, 1, row) / lay.kvp
        elif lay.kind == "helix":
            want = kv_size.request_bytes_per_rank(st.context, 64, lay.kvp, row)
        else:
            want = kv_size.request_bytes_per_rank(st.context, memory.page_size(spec, lay),
                                                  lay.kvp if lay.kind == "kvp" else 1, row)
        want *= (-(-spec.attention_layers // lay.pp) / spec.attention_layers) * st.kv_bytes
        res = step(st, lay, BATCH)
        np.testing.assert_allclose(res.kv_bytes, memory.requests_per_gpu(lay, BATCH) * want)


def test_sequence_split_divides_the_kv_read_and_dcp_matches_helix():
    st = _st()
    one = step(st, Layout("tp", tpa=8, tpf=8), BATCH).kv_read
    for n in (2, 4, 8):
        dcp = step(st, Layout("dcp", kvp=n, tpa=8, tpf=8), BATCH)
        np.testing.assert_allclose(dcp.kv_read, one / n, rtol=1e-12)  # MLA: every TP rank had it all
    helix = step(st, Layout("helix", kvp=64, tpf=64), BATCH)
    dcp = step(st, Layout("dcp", kvp=64, tpa=64, tpf=64, qrep=True), BATCH)
    np.testing.assert_allclose(helix.kv_read, dcp.kv_read)  # same shard, same heads attended


def test_gqa_dcp_only_shards_what_tp_duplicates():
    """SGLang / vLLM: DCP of a GQA model needs (TP / K) % DCP == 0; Helix does not."""
    llama = get_model("llama-405b")  # K = 8
    dcps = sorted(lay.kvp for lay in layouts_for(llama, 64, ("dcp",)))
    assert set(dcps) == {2, 4, 8}
    with pytest.raises(LayoutError, match="TP / 8 KV heads"):
        check_layout(llama, Layout("dcp", kvp=16, tpa=64, tpf=64))
    assert any(lay.kvp == 64 for lay in layouts_for(llama, 64, ("helix",)))  # KVP 64 x TPA 1


def test_exchanges_of_each_family():
    st = _st("llama-405b", weights="fp4", exchange_dtype="activation")
    tok = np.array([64.0])
    sg = Layout("dcp", kvp=8, tpa=64, tpf=64)
    sg_x = sum(exchange(st, sg, tok))  # AG q + AG LSE + fp32 all-reduce of H*D/T heads
    vl_x = sum(exchange(st, vllm_dcp(sg), tok))  # AG q + AG LSE + bf16 reduce-scatter
    hx_x = sum(exchange(st, Layout("helix", kvp=8, tpa=8, tpf=64), tok))  # one bf16 a2a, no q gather
    assert sg_x > vl_x > hx_x
    assert attended_heads(st.model, sg) == 16 == attended_heads(st.model, Layout("helix", kvp=8, tpa=8, tpf=64))
    fp32 = sum(exchange(replace(st, exchange_dtype="fp32"), Layout("helix", kvp=8, tpa=8, tpf=64), tok))
    assert fp32 > hx_x  # the plugin's default fp32 partials cost more than bf16


def test_mla_value_exchange_moves_values_and_holds_w_uv():
    st = _st()
    lat, val = Layout("helix", kvp=8, tpf=8), Layout("helix", kvp=8, tpf=8, mla_x="value")
    a, b = step(st, lat, BATCH), step(st, val, BATCH)
    assert (b.exchange < a.exchange).all()
    spec = st.model
    w_uv = spec.num_heads * spec.w_uv_per_head * spec.num_layers
    assert b.weights_bytes - a.weights_bytes == pytest.approx(w_uv * (1 - 1 / 8) * st.wbytes)


def test_bf16_mla_projections_at_fp4_weights_cost_their_bytes_and_nothing_else():
    """NVFP4 exports keep DeepSeek's MLA projections bf16: at fp4 weights they (q_a/q_b/kv_a,
    W_UK, W_UV) are read and held at 2 bytes, the rest at 0.5; GQA models and other weight
    dtypes are unchanged."""
    fp4, bf16 = _st(), _st(fp4_mla_projections="bf16")
    assert (fp4.proj_wbytes, bf16.proj_wbytes, bf16.wbytes) == (0.5, 2.0, 0.5)
    for lay in (Layout("helix", kvp=64, tpf=64), Layout("dcp", kvp=64, tpa=64, tpf=64)):
        a, b = step(fp4, lay, BATCH), step(bf16, lay, BATCH)
        assert (b.attention > a.attention).all() and (b.ttl > a.ttl).all()
    spec, value = fp4.model, Layout("helix", kvp=64, tpf=64, mla_x="value")
    a, b = step(fp4, value, BATCH), step(bf16, value, BATCH)
    assert np.allclose(b.ffn, a.ffn)  # value exchange: W_UV before it, o_proj (fp4) after
    held = spec.attn_shared_params + spec.attn_q_params + spec.num_heads * spec.w_uv_per_head
    assert b.weights_bytes - a.weights_bytes == pytest.approx(held * spec.num_layers * 1.5, rel=1e-9)
    for st in (_st(model="llama-405b"), _st(weights="fp8")):
        lay = layouts_for(st.model, 64)[0]
        same = step(replace(st, fp4_mla_projections="bf16"), lay, BATCH)
        assert same.ttl.tolist() == step(st, lay, BATCH).ttl.tolist()
    with pytest.raises(ValueError, match="fp4_mla_projections"):
        _st(fp4_mla_projections="int8")


def test_hopb_overlap_never_slower_without_latency_and_planner_picks_best():
    rng = np.random.default_rng(0)
    a, x = rng.uniform(0, 1, 1000), rng.uniform(0, 1, 1000)
    for s in (2, 4, 8):
        assert (hopb_overlap(a, 0.0, x, s) <= a + x + 1e-12).all()
    assert hopb_overlap(3.0, 0.5, 1.0, 1) == pytest.approx(4.5)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_helix_kvp1_equals_tp(n):
    st = _st("llama-70b", 1 << 17, "h100", "fp8")
    helix = step(st, Layout("helix", kvp=1, tpa=n, tpf=n), BATCH)
    tp = step(st, Layout("tp", tpa=n, tpf=n), BATCH)
    np.testing.assert_allclose(helix.ttl, tp.ttl)


def test_feasibility_and_max_concurrency():
    st = _st("llama-405b", 1 << 20, "h100", "fp8")
    one = step(st, Layout("tp", tpa=1, tpf=1), np.array([1]))
    assert not one.feasible.any() and one.weights_bytes > st.hw.hbm_capacity  # 405 GB on 80 GB
    for lay in (Layout("helix", kvp=8, tpa=8, tpf=64), Layout("dpa", tpa=8, dpa=8, tpf=64),
                Layout("dcp", kvp=8, tpa=64, tpf=64)):
        res = step(st, lay, np.array([1.0]))
        cap = memory.max_concurrency(st, lay, res.weights_bytes)
        assert cap > 0
        fits = step(st, lay, np.array([cap, cap + lay.dpa], dtype=float)).feasible
        assert fits.tolist() == [True, False], lay.label()


def test_layout_rules_and_enumeration():
    with pytest.raises(LayoutError):
        check_layout(get_model("llama-70b"), Layout("helix", kvp=1, tpa=16, tpf=16))  # TPA > K
    with pytest.raises(LayoutError):
        Layout("tp", tpa=4, tpf=2)  # FFN group must be the attention group
    with pytest.raises(LayoutError):
        Layout("dcp", kvp=3, tpa=8, tpf=8)  # DCP must divide TP
    lays = layouts_for(get_model("deepseek-r1"), 64, fi_a2a=True)
    assert {lay.kind for lay in lays} == set(KINDS) and all(lay.gpus == 64 for lay in lays)
    assert any(lay.xback == "fi_a2a" for lay in lays) and any(lay.qrep for lay in lays)


def test_launch_lines_of_each_family():
    st = _st()
    dcp = launch(st, Layout("dcp", kvp=8, tpa=64, tpf=8, ep=8, xback="fi_a2a", qrep=True), 16).line
    assert "--tp-size 64 --dcp-size 8 --ep-size 8 --dcp-comm-backend fi_a2a --dcp-replicate-q-proj" in dcp
    gqa = launch(_st("llama-405b"), Layout("dcp", kvp=8, tpa=64, tpf=64), 4).line
    assert "--dcp-size 8 --attention-backend triton" in gqa  # 0.5.23's GQA DCP decode backend
    assert "--attn-dp-size 8" in launch(st, Layout("dpa", tpa=8, dpa=8, tpf=64), 4).line
    assert not launch(st, Layout("kvp", kvp=8, tpa=8, tpf=8), 4).argv
    helix = launch(replace(st, exchange_dtype="activation"), Layout("helix", kvp=8, tpf=8, mla_x="value"), 4).line
    assert "--helix-mla-exchange value --helix-exchange-dtype activation" in helix
    assert "--kv-cache-dtype fp8_e4m3" in helix


def test_sweep_and_pareto():
    st = _st()
    sw = P.sweep(st, layouts_for(st.model, 16), P.batch_grid(512))
    f = P.pareto(sw)
    assert (np.diff(sw.tok_s_user[f]) < 0).all() and (np.diff(sw.tok_s_gpu[f]) > 0).all()
    assert sw.evaluated == len(sw.layouts) * len(P.batch_grid(512))


def test_cpu_profile_attention_time():
    hw = hardware_from_profile(FAKE_CPU)
    st = Setting(get_model("deepseek-r1"), hw, 8192, "bf16", "bf16", "activation")
    one = attention_layer_time(st, Layout("helix", kvp=1, tpf=1), 1)
    two = attention_layer_time(st, Layout("helix", kvp=2, tpf=2), 1)
    flops = 2 * 8192 * 128 * (576 + 512)
    assert one["attn"] == pytest.approx(flops / 5e10)  # fp32 compute-bound on CPU
    assert two["attn"] == pytest.approx(one["attn"] / 2) and two["exchange"] > 2e-4


@pytest.mark.parametrize("text,value", [("64K", 65536), ("1M", 1048576), ("1048576", 1048576), ("128k", 131072)])
def test_parse_context(text, value):
    assert P.parse_context(text) == value
