import dataclasses

import pytest

from sglang_helix import HelixConfig, HelixConfigError


def test_defaults_and_derived_sizes():
    cfg = HelixConfig(kvp=2, tpa=4, num_heads=64, num_kv_heads=8, page_size=16)
    assert (cfg.world_size, cfg.heads_per_tpa, cfg.kv_heads_per_tpa, cfg.heads_per_rank) == (8, 16, 2, 8)
    # g = tpa_rank * KVP + kvp_rank: ranks 2 and 3 form TPA group 1
    assert cfg.kvp_group_ranks(1) == [2, 3]
    assert [(cfg.tpa_rank(g), cfg.kvp_rank(g)) for g in range(8)][:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_frozen():
    cfg = HelixConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kvp = 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kvp=0), "kvp must be >= 1"),
        (dict(tpa=0), "tpa must be >= 1"),
        (dict(page_size=0), "page_size must be >= 1"),
        (dict(hopb_slices=0), "hopb_slices must be >= 1"),
        (dict(kvp=2.0), "kvp must be an int"),
        (dict(kvp=True), "kvp must be an int"),
        (dict(comm_backend="nccl"), "--helix-comm-backend"),
        (dict(tpa=2, num_heads=8, num_kv_heads=1, mla=True), "TPA must be 1"),
        (dict(num_heads=8, num_kv_heads=2, mla=True), "latent cache has 1 KV head"),
        (dict(tpa=4, num_heads=8, num_kv_heads=2), r"tpa=4 > num_kv_heads=2"),
        (dict(tpa=2, num_heads=12, num_kv_heads=3), "not divisible by tpa=2"),
        (dict(tpa=4, num_heads=6, num_kv_heads=4), "num_heads=6 is not divisible by tpa=4"),
        (dict(num_heads=12, num_kv_heads=8), "not a multiple of num_kv_heads"),
        (dict(kvp=3, num_heads=8, num_kv_heads=1), "not divisible by KVP x TPA = 3"),
        (dict(mla=True, mla_exchange="values"), "--helix-mla-exchange"),
        (dict(num_heads=4, num_kv_heads=2, mla_exchange="value"), "GQA layout.*drop --helix-mla"),
        (dict(exchange_dtype="bf16"), "exchange_dtype='bf16' is unknown.*--helix-exchange-dtype"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, match):
    with pytest.raises(HelixConfigError, match=match):
        HelixConfig(**kwargs)


def test_rank_bounds():
    cfg = HelixConfig(kvp=2, num_heads=4)
    with pytest.raises(HelixConfigError, match="outside"):
        cfg.kvp_rank(2)
    with pytest.raises(HelixConfigError, match="outside"):
        cfg.kvp_group_ranks(1)


def test_partial_dtype_follows_exchange_dtype():
    import torch

    from sglang_helix.comm import HelixCommError, partial_dtype

    assert HelixConfig().exchange_dtype == "fp32"
    assert partial_dtype("fp32", torch.bfloat16) is torch.float32
    assert partial_dtype("activation", torch.bfloat16) is torch.bfloat16
    assert partial_dtype("activation", torch.float16) is torch.float16
    with pytest.raises(HelixCommError, match="--helix-exchange-dtype"):
        partial_dtype("bf16", torch.bfloat16)
