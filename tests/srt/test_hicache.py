"""HiCache on SGLang 0.5.23's own host pools and transfer engine, on CPU (no server).

- The CPU-engine fix (srt/cpu/hicache_fix.py), Helix off: SGLang's MHA (K/V-symmetric and
  asymmetric) and MLA host pools in each CPU layout, built unpinned, take a backup of some
  device rows and load them back layer by layer through SGLang's `L2TransferEngine`: bit
  identical (fp8 pages included), no other host row touched; unsupported layouts refused.
- Helix (srt/memory/host_pool.py, host_hooks.py): one Helix pool + colored allocator + host pool
  per KVP rank, the same operation stream on every rank (SPMD). A request's pages are backed up
  into host pages of the same colors (identical host ids on every rank), each rank copying only
  its own pages; evicted, overwritten, and loaded back into fresh device pages of the host pages'
  colors (the logical positions' colors): bit identical on every rank.
- The storage tier (srt/memory/host_storage.py): SGLang's own page get / set of the controller
  over `HelixFileStorage`: each rank writes only its pages, every rank sees every page of its KVP
  group, a read back restores each rank's pages bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import NEEDS_SGLANG

pytestmark = NEEDS_SGLANG

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
    from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import _mha_host_inputs
    from sglang.srt.mem_cache.l2_transfer import L2Transfer, L2TransferEngine
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope
    from sglang.srt.mem_cache.pool_host.mha import AsymmetricMHATokenToKVPoolHost, MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    from sglang_helix.srt.cpu import hicache_fix
    from sglang_helix.srt.memory import allocator as alloc_mod
    from sglang_helix.srt.memory import host_hooks, host_pool, host_storage, pools

from sglang_helix.sharding import cyclic_colors, page_ids_of_locs, page_owner

P = 4
I64 = torch.int64
SENTINEL = 0xAB
MHA = dict(head_num=2, head_dim=8, layer_num=2, device="cpu", enable_memory_saver=False)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, layer_num=2, device="cpu", enable_memory_saver=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I64)


@pytest.fixture
def cpu_fix(monkeypatch):
    """The CPU fix's transfer hooks on SGLang's host pool classes (what the hook table installs on
    the CPU engine)."""
    def wrap(original, hook):
        return lambda pool, *args, **kwargs: hook(original, pool, *args, **kwargs)

    for cls in (MHATokenToKVPoolHost, AsymmetricMHATokenToKVPoolHost, MLATokenToKVPoolHost):
        for name, hook in (("backup_from_device_all_layer", hicache_fix._around_backup),
                           ("load_to_device_per_layer", hicache_fix._around_load)):
            monkeypatch.setattr(cls, name, wrap(cls.__dict__[name], hook))
    return L2TransferEngine("kernel")


def native_host(device_pool, layout: str):
    """SGLang's host pool for `device_pool` (as its assembler builds it), unpinned."""
    with host_memory_budget_scope(1 << 30):
        if isinstance(device_pool, MLATokenToKVPool):
            info = device_pool.get_device_pool_infos()[0].buffer_info
            return MLATokenToKVPoolHost(info, 2.0, 0, P, layout, pin_memory=False, device="cpu",
                                        override_kv_cache_dim=device_pool.kv_cache_dim,
                                        device_capacity_tokens=device_pool.size,
                                        start_layer=device_pool.start_layer, end_layer=device_pool.end_layer,
                                        target_layer_num=device_pool.layer_num)
        cls, info, kwargs = _mha_host_inputs(device_pool)
        return cls(info, 2.0, 0, P, layout, pin_memory=False, device="cpu", **kwargs)


def device_buffers(pool) -> list[torch.Tensor]:
    return list(pool.kv_buffer) if isinstance(pool, MLATokenToKVPool) else [*pool.k_buffer, *pool.v_buffer]


def host_buffers(host) -> list[torch.Tensor]:
    host = getattr(host, "host_pool", host)
    return [host.kv_buffer] if isinstance(host, MLATokenToKVPoolHost) else [host.k_buffer, host.v_buffer]


def fill(buffers, seed: int | None) -> None:
    g = torch.Generator().manual_seed(seed or 0)
    for buf in buffers:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.full_like(raw, SENTINEL) if seed is None
                  else torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def rows(buffers, index: torch.Tensor) -> list[torch.Tensor]:
    return [buf[index].view(torch.uint8).clone() for buf in buffers]


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def host_token_bytes(host, index: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's host bytes of host token rows `index`, read through the pool's layout."""
    host = getattr(host, "host_pool", host)
    out = []
    for buf in host_buffers(host):
        for layer in range(host.layer_num):
            view = hicache_fix.layer_view(host, buf, layer)
            out.append(view[hicache_fix.host_rows(host, index)].view(torch.uint8).clone())
    return out


def backup(engine, host, device_pool, host_idx, device_idx) -> None:
    engine.submit_device_to_host([L2Transfer(host, device_pool, host_idx, device_idx)])


def load(engine, host, device_pool, host_idx, device_idx) -> None:
    engine.submit_host_to_device([L2Transfer(host, device_pool, host_idx, device_idx)],
                                 transfer_layer_id_max=device_pool.layer_num)


# ---------------------------------------------------------------- the CPU fix, Helix off

CASES = [(kind, layout) for kind in ("mha", "mla") for layout in hicache_fix.CPU_LAYOUTS] if \
    importlib.util.find_spec("sglang") else []


def plain_pool(kind: str, dtype, v_head_dim: int = 8):
    if kind == "mla":
        return MLATokenToKVPool(64, P, dtype=dtype, **MLA)
    return MHATokenToKVPool(64, P, dtype=dtype, v_head_dim=v_head_dim, **MHA)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind, layout", CASES + [("mha-asym", "page_first"), ("mha-asym", "page_first_direct")])
def test_cpu_backup_and_load_back_are_bit_identical(cpu_fix, kind, layout, dtype):
    device_pool = plain_pool(kind.split("-")[0], dtype, v_head_dim=6 if kind == "mha-asym" else 8)
    host = native_host(device_pool, layout)
    assert not host.pin_memory
    fill(device_buffers(device_pool), seed=7)
    fill(host_buffers(host), seed=None)
    device_idx = torch.cat([torch.arange(p * P, p * P + P) for p in (9, 3, 12)])
    host_idx = torch.cat([torch.arange(p * P, p * P + P) for p in (2, 7, 5)])
    want = rows(device_buffers(device_pool), device_idx)
    backup(cpu_fix, host, device_pool, host_idx, device_idx)
    untouched = torch.tensor([i for i in range(host.size) if i not in set(host_idx.tolist())])
    assert all(bool((x == SENTINEL).all()) for x in host_token_bytes(host, untouched))
    fill(device_buffers(device_pool), seed=None)
    target = torch.arange(4 * P, 7 * P)  # other device rows: the tree's new pages
    load(cpu_fix, host, device_pool, host_idx, target)
    assert same(rows(device_buffers(device_pool), target), want)
    others = torch.tensor([i for i in range(device_pool.size) if not 4 * P <= i < 7 * P])
    assert all(bool((x == SENTINEL).all()) for x in rows(device_buffers(device_pool), others))


def test_cpu_host_pools_are_unpinned_and_other_layouts_refused_at_build(monkeypatch):
    seen = {}
    hicache_fix._around_host_kv_init(lambda pool, **kw: seen.update(kw), None, pin_memory=True)
    assert seen["pin_memory"] is torch.cuda.is_available()
    from sglang.srt.mem_cache.pool_host.base import HostKVCache

    original = HostKVCache.__dict__["__init__"]
    monkeypatch.setattr(HostKVCache, "__init__", lambda pool, *a, **kw: hicache_fix._around_host_kv_init(
        original, pool, *a, **kw))
    assert not native_host(plain_pool("mla", torch.float32), "page_first").pin_memory
    with pytest.raises(hicache_fix.HiCacheCpuError, match="--hicache-mem-layout page_head: the CPU"):
        native_host(plain_pool("mha", torch.float32), "page_head")


# ---------------------------------------------------------------- Helix: one host pool per KVP rank


class Rank:
    """One KVP rank: its Helix pool, colored allocator and HiCache host pool."""

    def __init__(self, kind: str, dtype, kvp: int, rank: int, size: int = 128):
        if kind == "mla":
            self.pool = pools.HelixMLATokenToKVPool(size, P, dtype=dtype, kvp=kvp, kvp_rank=rank, **MLA)
        else:
            self.pool = pools.HelixMHATokenToKVPool(size, P, dtype=dtype, kvp=kvp, kvp_rank=rank,
                                                    v_head_dim=8, **MHA)
        self.alloc = alloc_mod.HelixPagedAllocator(size, P, dtype, "cpu", self.pool, False, kvp=kvp)
        self.host = host_pool.HelixHostPool(native_host(self.pool, "page_first"), kvp, rank)
        self.kvp, self.rank = kvp, rank

    def extend(self, n: int) -> torch.Tensor:
        return self.alloc.alloc_extend(t([0]), t([0]), t([n]), t([n]), t([-1]), n)

    def own_rows(self, locs: torch.Tensor) -> list[torch.Tensor]:
        local, owned = self.pool.local_rows(locs)
        return rows(device_buffers(self.pool), local[owned])

    def controller(self):
        group = SimpleNamespace(anchor_entry=SimpleNamespace(host_pool=self.host), alloc=self.host.alloc)
        return SimpleNamespace(mem_pool_host=group, mem_pool_device_allocator=self.alloc)


def colors_of(locs: torch.Tensor, kvp: int) -> list[int]:
    return page_owner(page_ids_of_locs(locs, P), kvp).tolist()


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("kvp", [2, 3])
@pytest.mark.parametrize("dtype", [DTYPES["bf16"], DTYPES["fp8"]], ids=["bf16", "fp8"])
def test_helix_backup_and_load_back_per_rank(cpu_fix, kind, kvp, dtype):
    ranks = [Rank(kind, dtype, kvp, r) for r in range(kvp)]
    n = 6 * P  # a cached prefix of 6 whole pages from position 0
    locs = [rk.extend(n) for rk in ranks]
    assert all(torch.equal(x, locs[0]) for x in locs)
    locs = locs[0]
    for rk in ranks:
        fill(device_buffers(rk.pool), seed=10 + rk.rank)
        fill(host_buffers(rk.host), seed=None)
    want = [rk.own_rows(locs) for rk in ranks]

    # write-through / write-back: SGLang's controller asks for host pages of these device pages
    hosts = []
    for rk in ranks:
        def original(controller, device_indices, *args, start_owner=None, **kwargs):
            return controller.mem_pool_host.alloc(len(device_indices), start_owner=start_owner)
        hosts.append(host_hooks._around_allocate_host_transfers(original, rk.controller(), locs))
    host_idx = hosts[0]
    assert all(torch.equal(h, host_idx) for h in hosts)  # the tree's host values: SPMD-identical
    assert colors_of(host_idx, kvp) == colors_of(locs, kvp) == cyclic_colors(0, 6, kvp).tolist()
    for rk in ranks:  # the controller's sharded path: each rank its own (host, device) rows
        h, d = rk.host.owned_rows(host_idx, locs)
        assert len(h) == sum(c == rk.rank for c in colors_of(locs, kvp)) * P
        backup(cpu_fix, rk.host, rk.pool, h, d)
        mine = [i for i in host_idx.tolist() if page_owner(i // P, kvp) == rk.rank]
        local = rk.host.placement.local_index(t(mine))
        untouched = t([i for i in range(rk.host.host_pool.size) if i not in set(local.tolist())])
        assert all(bool((x == SENTINEL).all()) for x in host_token_bytes(rk.host, untouched))
        state = rk.host.state()["per_kvp_rank"]
        assert [c["used_pages"] for c in state] == [colors_of(locs, kvp).count(c) for c in range(kvp)]

    # evicted from the device; another request takes and overwrites pages
    for rk in ranks:
        rk.alloc.free(locs)
        other = rk.extend(5 * P)
        local, owned = rk.pool.local_rows(other)
        for buf in device_buffers(rk.pool):
            buf[local[owned]] = buf[:1].expand_as(buf[local[owned]])

    # a host hit: SGLang's controller loads back into device pages the hook allocates
    for rk, before in zip(ranks, want):
        def original(controller, host_indices, *args, device_indices=None, **kwargs):
            return device_indices
        new = host_hooks._around_load(original, rk.controller(), host_idx)
        assert colors_of(new, kvp) == colors_of(host_idx, kvp)  # each page back on its owner
        assert not torch.equal(new, locs)
        h, d = rk.host.owned_rows(host_idx, new)
        load(cpu_fix, rk.host, rk.pool, h, d)
        assert same(rk.own_rows(new), before)  # atol=0
        rk.host.free(host_idx)
        assert rk.host.color_free_counts() == [rk.host.per_color] * kvp


def test_backup_host_pages_take_the_device_pages_colors_whatever_phase_the_tree_passes():
    """SGLang's tree may pass its own rotation phase (an int) as start_owner; under Helix the
    device pages' colors decide (a phase off by one would put every page on the wrong rank)."""
    rk = Rank("mha", torch.float32, 2, 0)
    locs = rk.extend(3 * P)  # logical pages 0 1 2: colors 0 1 0

    def original(controller, device_indices, *args, start_owner=None, **kwargs):
        return controller.mem_pool_host.alloc(len(device_indices), start_owner=start_owner)

    host_idx = host_hooks._around_allocate_host_transfers(original, rk.controller(), locs, start_owner=1)
    assert colors_of(host_idx, 2) == colors_of(locs, 2) == [0, 1, 0]


def test_helix_host_pool_allocation_rules():
    rk = Rank("mha", torch.float32, 2, 1)
    host, per = rk.host, rk.host.per_color
    assert host.logical_size == 2 * per * P and host.available_size() == host.logical_size
    with pytest.raises(pools.HelixPoolError, match="without the colors of its pages"):
        host.alloc(2 * P)
    with pytest.raises(pools.HelixPoolError, match="whole pages of 4 tokens"):
        host.alloc(P + 1, start_owner=0)
    with pytest.raises(pools.HelixPoolError, match="3 page colors for 2 host pages"):
        host.alloc(2 * P, start_owner=t([0, 1, 0]))
    cyclic = host.alloc(3 * P, start_owner=3)  # an int: the first page's color, then cyclic
    assert colors_of(cyclic, 2) == [1, 0, 1]
    assert host.alloc(2 * per * P, start_owner=0) is None  # short of pages: nothing taken
    assert host.color_free_counts() == [per - 1, per - 2]
    assert host.available_size() == 2 * (per - 2) * P
    host.clear()
    assert host.color_free_counts() == [per, per]


def test_helix_load_back_without_pages_of_a_color_takes_nothing():
    rk = Rank("mha", torch.float32, 2, 0, size=32)  # 4 pages per color
    host_idx = rk.host.alloc(5 * P, start_owner=0)  # colors 0 1 0 1 0
    taken = rk.extend(6 * P)  # device: 3 pages of each color left? no: 4 - 3 = 1 each
    free = rk.alloc.color_free_counts()
    assert host_hooks._around_load(lambda *a, **k: pytest.fail("no load"), rk.controller(), host_idx) is None
    assert rk.alloc.color_free_counts() == free
    rk.alloc.free(taken)
    free = rk.alloc.color_free_counts()
    failed = host_hooks._around_load(lambda *a, **k: None, rk.controller(), host_idx)
    assert failed is None and rk.alloc.color_free_counts() == free  # the hook's pages came back


def test_only_helix_device_pools_get_a_helix_host_pool():
    helix = Rank("mla", torch.float32, 2, 1)
    native = helix.host.host_pool
    wrapped = host_hooks._around_build_kv_host_pool(lambda **kw: native, kv_pool=helix.pool, page_size=P)
    assert isinstance(wrapped, host_pool.HelixHostPool) and (wrapped.kvp, wrapped.kvp_rank) == (2, 1)
    plain = plain_pool("mla", torch.float32)
    assert host_hooks._around_build_kv_host_pool(lambda **kw: native, kv_pool=plain, page_size=P) is native
    assert host_hooks.helix_host_pool(SimpleNamespace(mem_pool_host=native)) is None


# ---------------------------------------------------------------- the storage tier (file)


def storage_config(rank: int, tmp_path, mla: bool = False):
    return HiCacheStorageConfig(tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name="org/tiny-helix-kvp2",
                                extra_config={"file_storage_path": str(tmp_path)})


def test_storage_tier_writes_each_page_once_by_its_owner(tmp_path):
    ranks = [Rank("mha", torch.bfloat16, 2, r) for r in range(2)]
    stores = [host_storage.HelixFileStorage(storage_config(r, tmp_path), 2, r) for r in range(2)]
    assert stores[1].tp_config_suffix == HiCacheFile(storage_config(1, tmp_path)).tp_config_suffix
    keys = [f"page{i}" for i in range(4)]
    hosts = [rk.host.alloc(4 * P, start_owner=1) for rk in ranks]  # logical pages 1..4: 1 0 1 0
    host_idx = hosts[0]
    assert torch.equal(hosts[1], host_idx)
    for rk in ranks:
        fill(host_buffers(rk.host), seed=20 + rk.rank)
    want = [host_token_bytes(rk.host, rk.host.placement.filter_local(host_idx, rk.rank)) for rk in ranks]
    for rk, store in zip(ranks, stores):  # SGLang's controller write-back to storage
        ctrl = SimpleNamespace(storage_host_pool=rk.host, storage_backend=store, page_size=P)
        assert HiCacheController._generic_page_set(ctrl, keys, host_idx)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 4  # every page once, by its owner (1/KVP of the pages per rank)
    assert sum(f.endswith(stores[0].tp_config_suffix + ".bin") for f in files) == 2
    for store in stores:
        assert store.batch_exists(keys) == 4 and store.batch_exists([*keys[:2], "absent", keys[3]]) == 2
        assert store.batch_exists_v2(keys).kv_hit_pages == 4
    for rk, store, before in zip(ranks, stores, want):  # a storage hit read back into host pages
        fill(host_buffers(rk.host), seed=None)
        ctrl = SimpleNamespace(storage_host_pool=rk.host, storage_backend=store, page_size=P)
        op = SimpleNamespace(request_id="r", is_terminated=lambda: False)
        assert HiCacheController._generic_page_get(ctrl, op, keys, host_idx) == 4
        got = host_token_bytes(rk.host, rk.host.placement.filter_local(host_idx, rk.rank))
        assert same(got, before)
        assert store.get("absent", torch.zeros(4)) is None


def test_storage_hooks_keep_helix_pages_per_rank(tmp_path):
    with pytest.raises(pools.HelixPoolError, match="must not share MLA files"):
        host_storage.HelixFileStorage(storage_config(0, tmp_path, mla=True), 2, 0)
    rk = Rank("mla", torch.float32, 2, 0)
    ctrl = rk.controller()
    config = host_storage._around_generate_storage_config(lambda c: storage_config(0, tmp_path, mla=True), ctrl)
    assert not config.is_mla_model
    made = host_storage._around_create_builtin_backend(None, None, "file", None, config, rk.host)
    assert isinstance(made, host_storage.HelixFileStorage)
    with pytest.raises(pools.HelixPoolError, match="use --hicache-storage-backend file"):
        host_storage._around_create_builtin_backend(None, None, "mooncake", None, config, rk.host)
    prefetch = host_storage._around_alloc_prefetch_host_buffers(
        None, ctrl, SimpleNamespace(storage_start=3 * P), 4 * P)
    assert colors_of(prefetch, 2) == [1, 0, 1, 0]  # positions 3..6: their owners
    assert rk.host.storage_format_tag == "helix-kvp2"
