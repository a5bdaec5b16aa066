"""sglang_helix.kv_size against independent constructions: KV rows built as the pools build their
buffers, heads dealt to ranks as SGLang deals them, pages dealt round-robin by the sharding math,
requests admitted one by one (exhaustive small ranges + hypothesis)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sglang_helix import kv_size, sharding
from sglang_helix.kv_size import KVShape, KVSizeError

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def _heads_dealt(num_kv_heads: int, ranks: int) -> list[int]:
    """KV heads each rank holds as SGLang places them: K / N each when N divides K, one
    replicated head each when N > K, and (CPU engine) K padded up to a multiple of N otherwise."""
    padded = num_kv_heads if num_kv_heads >= ranks else ranks
    padded = -(-padded // ranks) * ranks
    owners = [h * ranks // padded for h in range(padded)]  # contiguous blocks of heads per rank
    return [owners.count(r) for r in range(ranks)]


def _row_bytes(shape: KVShape, ranks: int, dtype: torch.dtype) -> int:
    """Bytes of one token's row in buffers laid out as the KV pools lay them out, every layer:
    MLA kv_buffer [rows, 1, R + Dr]; GQA k_buffer [rows, h, D] + v_buffer [rows, h, Dv]."""
    total = 0
    for _ in range(shape.layers):
        if shape.mla:
            bufs = [torch.empty(2, 1, shape.kv_lora_rank + shape.qk_rope_dim, dtype=dtype)]
        else:
            heads = max(_heads_dealt(shape.num_kv_heads, ranks))
            bufs = [torch.empty(2, heads, shape.head_dim, dtype=dtype),
                    torch.empty(2, heads, shape.v_head_dim, dtype=dtype)]
        total += sum(b[0].numel() * b.element_size() for b in bufs)
    return total


@pytest.mark.parametrize("num_kv_heads", range(1, 17))
def test_heads_per_rank_is_what_each_rank_holds(num_kv_heads):
    for ranks in range(1, 17):
        shape = KVShape.gqa(num_kv_heads, 8)
        dealt = _heads_dealt(num_kv_heads, ranks)
        assert shape.heads_per_rank(ranks) == max(dealt), (num_kv_heads, ranks, dealt)
        if num_kv_heads % ranks == 0:  # plain TP splits the heads exactly
            assert shape.heads_per_rank(ranks) * ranks == num_kv_heads


@given(layers=st.integers(1, 6), heads=st.integers(1, 12), head_dim=st.integers(1, 40),
       v_head_dim=st.integers(1, 40), ranks=st.integers(1, 16), dtype=st.sampled_from(DTYPES))
def test_gqa_bytes_per_token_match_pool_buffers(layers, heads, head_dim, v_head_dim, ranks, dtype):
    shape = KVShape.gqa(heads, head_dim, v_head_dim, layers)
    got = shape.bytes_per_token(kv_size.itemsize(dtype), ranks)
    assert got == _row_bytes(shape, ranks, dtype)
    assert shape.elems_per_token(ranks) * kv_size.itemsize(dtype) * layers == got


@given(layers=st.integers(1, 6), rank=st.integers(1, 600), rope=st.integers(0, 80),
       ranks=st.integers(1, 16), dtype=st.sampled_from(DTYPES))
def test_mla_latent_is_replicated_on_every_rank(layers, rank, rope, ranks, dtype):
    shape = KVShape.mla_latent(rank, rope, layers)
    got = shape.bytes_per_token(kv_size.itemsize(dtype), ranks)
    assert got == _row_bytes(shape, ranks, dtype) == shape.bytes_per_token(kv_size.itemsize(dtype))
    assert shape.heads_per_rank(ranks) == 1


def test_known_models():
    # DeepSeek-V3: 61 layers x (512 + 64) x bf16
    v3 = {"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    assert KVShape.from_hf_config(v3).bytes_per_token(2, ranks=8) == 70272
    # Llama-3-70B: 80 layers, 8 KV heads of 128; plain TP 8 holds one head per rank
    llama = {"num_hidden_layers": 80, "num_key_value_heads": 8, "num_attention_heads": 64,
             "hidden_size": 8192}
    assert KVShape.from_hf_config(llama).bytes_per_token(2) == 80 * 8 * 256 * 2
    assert KVShape.from_hf_config(llama).bytes_per_token(2, ranks=8) == 80 * 256 * 2


def test_tiny_model_configs():
    from sglang_helix.dev.tiny_models import model_config

    mla = KVShape.from_hf_config(model_config("mla", 384, 0, 1, 2))
    assert (mla.layers, mla.kv_lora_rank, mla.qk_rope_dim) == (3, 48, 8)
    assert mla.bytes_per_token(4) == 3 * 56 * 4 == 672
    gqa = KVShape.from_hf_config(model_config("gqa", 384, 0, 1, 2))
    assert gqa == KVShape.gqa(2, 16, 16, 4)
    assert (gqa.bytes_per_token(4, ranks=2), gqa.bytes_per_token(4)) == (512, 1024)
    no_head_dim = {"num_hidden_layers": 4, "num_key_value_heads": 2, "num_attention_heads": 8,
                   "hidden_size": 64}  # head_dim = hidden / heads = 8
    assert KVShape.from_hf_config(no_head_dim).bytes_per_token(2) == 4 * 2 * 16 * 2


def test_of_reads_sglang_dimension_names():
    pool = SimpleNamespace(kv_lora_rank=48, qk_rope_head_dim=8, head_dim=99, v_head_dim=99)
    assert KVShape.of(pool, mla=True, layers=3, num_kv_heads=7) == KVShape.mla_latent(48, 8, 3)
    mha = SimpleNamespace(head_dim=16, v_head_dim=12)
    assert KVShape.of(mha, mla=False, layers=2, num_kv_heads=4) == KVShape.gqa(4, 16, 12, 2)


def test_perf_specs_use_the_same_rows():
    from sglang_helix.perf.layouts import Layout
    from sglang_helix.perf.model import kv_elems_per_gpu
    from sglang_helix.perf.specs import MODELS

    for spec in MODELS.values():
        shape = spec.kv_shape
        assert spec.kv_elems_per_token == shape.elems_per_token()
        for tpa in (1, 2, 4, 8, 16):
            heads = spec.num_kv_heads if spec.mla else -(-spec.num_kv_heads // tpa)
            width = spec.kv_lora_rank + spec.qk_rope_dim if spec.mla else 2 * spec.head_dim * heads
            lay = Layout(kind="helix", tpa=tpa, kvp=1, tpf=tpa)
            assert kv_elems_per_gpu(spec, lay) == shape.elems_per_token(tpa) == width


def test_itemsize():
    assert [kv_size.itemsize(d) for d in DTYPES] == [4, 2, 2, 1, 1]
    assert kv_size.itemsize("bfloat16") == kv_size.itemsize("torch.bfloat16") == 2
    assert kv_size.itemsize("float8_e4m3fn") == 1
    for bad in ("fp8", "nn", "bf16"):
        with pytest.raises(KVSizeError, match="unknown KV dtype"):
            kv_size.itemsize(bad)


@pytest.mark.parametrize("make, message", [
    (lambda: KVShape(0, kv_lora_rank=4), "layers"),
    (lambda: KVShape.gqa(0, 8), "num_kv_heads"),
    (lambda: KVShape.gqa(2, 0), "head_dim"),
    (lambda: KVShape(1, 2, 8, 8, kv_lora_rank=4), "MLA KVShape"),
    (lambda: KVShape(1, 2, 8, 8, qk_rope_dim=4), "qk_rope_dim"),
    (lambda: KVShape.gqa(2, 8).heads_per_rank(0), "ranks"),
    (lambda: KVShape.mla_latent(4, 2).elems_per_token(0), "ranks"),
    (lambda: KVShape.gqa(2, 8).bytes_per_token(0), "item_bytes"),
])
def test_refusals_name_the_field(make, message):
    with pytest.raises(KVSizeError, match=message):
        make()


# ----------------------------------------------------------------------------- pages and pools


def test_max_pages_per_rank_is_the_busiest_ranks_share():
    for page_size in (1, 2, 3, 16):
        for kvp in range(1, 6):
            for tokens in range(0, 4 * page_size * kvp + 3):
                local = [sharding.local_num_pages(tokens, r, page_size, kvp) for r in range(kvp)]
                assert sum(local) == sharding.num_pages(tokens, page_size)
                assert kv_size.max_pages_per_rank(tokens, page_size, kvp) == max(local)


def test_request_bytes_known_values():
    # 512 + 16 tokens = 9 pages of 64: plain TP holds 9 on every rank, KVP 2 at most 5 per rank
    assert kv_size.max_pages_per_rank(528, 64) == 9 and kv_size.max_pages_per_rank(528, 64, 2) == 5
    assert kv_size.request_bytes_per_rank(528, 64, 1, 672) == 9 * 64 * 672 == 387072
    assert kv_size.request_bytes_per_rank(528, 64, 2, 672) == 215040
    assert kv_size.max_pages_per_rank(0, 64, 2) == 0 and kv_size.max_pages_per_rank(64, 64) == 1
    for bad in ((-1, 64, 1), (10, 0, 1), (10, 64, 0), (1.5, 64, 1)):
        with pytest.raises(KVSizeError):
            kv_size.max_pages_per_rank(*bad)


def _simulated_fit(pool_pages, tokens, page_size, kvp):
    """Admit identical requests one by one, placing page j of each on rank j % kvp, until a
    rank runs out (independent of the closed form)."""
    used, admitted = [0] * kvp, 0
    while True:
        need = [0] * kvp
        for j in range(-(-tokens // page_size)):
            need[j % kvp] += 1
        if any(u + n > pool_pages for u, n in zip(used, need)):
            return admitted
        used = [u + n for u, n in zip(used, need)]
        admitted += 1


@pytest.mark.parametrize("kvp", [1, 2, 3, 4])
def test_max_requests_matches_admission(kvp):
    for pool_pages in (0, 1, 7, 64, 129, 640):
        for tokens in (1, 63, 64, 65, 528, 1088, 4160, 16448):
            for page_size in (16, 64):
                got = kv_size.max_requests(pool_pages, tokens, page_size, kvp)
                assert got == _simulated_fit(pool_pages, tokens, page_size, kvp), (
                    pool_pages, tokens, page_size, kvp)
    with pytest.raises(KVSizeError, match="pool_pages_per_rank"):
        kv_size.max_requests(-1, 10, 64, kvp)
    with pytest.raises(KVSizeError, match="0-token"):
        kv_size.max_requests(4, 0, 64, kvp)


@given(logical=st.integers(0, 10**6), page_size=st.integers(1, 128), kvp=st.integers(1, 8),
       bpt=st.integers(1, 10**5))
def test_pool_bytes_add_one_padding_page(logical, page_size, kvp, bpt):
    rows = sharding.local_pool_tokens(logical, page_size, kvp)
    assert kv_size.pool_bytes(rows, page_size, bpt) == rows * bpt + page_size * bpt
    # a Helix rank's pool (1/KVP of the pages) plus its padding page never exceeds plain TP's
    assert kv_size.pool_bytes(rows, page_size, bpt) <= kv_size.pool_bytes(logical, page_size, bpt)


def test_pool_bytes_refusals():
    with pytest.raises(KVSizeError, match="rows"):
        kv_size.pool_bytes(-1, 16, 4)
    with pytest.raises(KVSizeError, match="page_size"):
        kv_size.pool_bytes(16, 0, 4)
