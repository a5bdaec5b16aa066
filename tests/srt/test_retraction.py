"""PD decode retraction (`cpu_tensor` backup) with Helix pools, through SGLang 0.5.23's own calls.

SGLang's decode server backs a retracted request up with `backup_kv_cache` ->
`Req.offload_kv_cache` -> allocator/pool `get_cpu_copy(locs of its first seqlen - 1 tokens)`, frees
its pages, and on resume allocates fresh ones (`alloc_extend` from position 0, as
`DecodePreallocQueue._pre_alloc` does) and calls `restore_kv_cache` -> `Req.load_kv_cache` ->
`load_cpu_copy(backup, new locs)`. Here those SGLang functions run on one Helix pool + colored
allocator per KVP rank (the same operation stream on every rank, as the SPMD scheduler does), with
other requests allocating in between so the restored request lands on different page ids.
Checked: every rank copies out only its own pages; the new pages have the same owner color per
logical page; the restored rows are bit-identical (atol=0) on every rank; nothing else changes.
Plus the launch rule: SGLang's own argument resolution of a GPU PD decode launch gets `cpu_tensor`
by default under Helix (SGLang alone would take `host_pool` for an MHA pool), `host_pool` refused.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import NEEDS_SGLANG, TINY_LLAMA_CONFIG

pytestmark = NEEDS_SGLANG

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.common import backup_kv_cache, restore_kv_cache
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from sglang_helix.srt.memory import allocator as alloc_mod
    from sglang_helix.srt.memory import pools, retraction

from sglang_helix.config import HelixConfigError
from sglang_helix.sharding import page_owner

P = 4
I64 = torch.int64
MHA_KW = dict(head_num=2, head_dim=8, v_head_dim=6, layer_num=2, device="cpu", enable_memory_saver=False)
MLA_KW = dict(kv_lora_rank=16, qk_rope_head_dim=4, layer_num=2, device="cpu", enable_memory_saver=False)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I64)


class FakeReq:
    """The fields SGLang's offload/load_kv_cache read, with SGLang's own methods."""

    offload_kv_cache = Req.offload_kv_cache
    load_kv_cache = Req.load_kv_cache
    _mamba_pool_needing_backup = Req._mamba_pool_needing_backup

    def __init__(self, req_pool_idx: int, seqlen: int):
        self.seqlen = seqlen
        self.kv = SimpleNamespace(req_pool_idx=req_pool_idx, mamba_pool_idx=None, holds_mamba=False,
                                  retraction_backup=None)


class Rank:
    """One KVP rank: its Helix pool, colored allocator and req_to_token table."""

    def __init__(self, kind: str, dtype, kvp: int, rank: int, size: int = 256):
        kw = MHA_KW if kind == "mha" else MLA_KW
        cls = pools.HelixMHATokenToKVPool if kind == "mha" else pools.HelixMLATokenToKVPool
        self.pool = cls(size, P, dtype=dtype, kvp=kvp, kvp_rank=rank, **kw)
        self.alloc = alloc_mod.HelixPagedAllocator(size, P, dtype, "cpu", self.pool, True, kvp=kvp)
        self.r2t = ReqToTokenPool(8, 64, "cpu", False)
        self.kvp, self.rank = kvp, rank

    def extend(self, row: int, n: int) -> torch.Tensor:
        """Pages for positions 0..n-1 of request `row` (what _pre_alloc does), into req_to_token."""
        locs = self.alloc.alloc_extend(t([0]), t([0]), t([n]), t([n]), t([-1]), n)
        assert locs is not None
        self.r2t.req_to_token[row, :n] = locs.to(self.r2t.req_to_token.dtype)
        return locs

    def decode(self, row: int, seq: int) -> None:
        last = self.r2t.req_to_token[row, seq - 2 : seq - 1].to(I64)
        loc = self.alloc.alloc_decode(t([seq]), t([seq]), last)
        self.r2t.req_to_token[row, seq - 1] = loc[0]

    def locs(self, row: int, n: int) -> torch.Tensor:
        return self.r2t.req_to_token[row, :n].to(I64)

    def buffers(self):
        return retraction.pool_buffers(self.pool)

    def fill_random(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for buf in self.buffers():
            raw = buf.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))

    def rows_of(self, locs: torch.Tensor) -> list[torch.Tensor]:
        """This rank's stored rows of its owned tokens among `locs` (token order)."""
        rows, owned = self.pool.local_rows(locs)
        return [buf[rows[owned]].clone() for buf in self.buffers()]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


DTYPES = [torch.float32, torch.bfloat16, "fp8"]


def resolve(dtype):
    if dtype == "fp8":  # Helix pools hold fp8 KV pages: a break there must fail, not skip
        return torch.float8_e4m3fn
    return dtype


def check_colored_by_position(locs: torch.Tensor, kvp: int) -> None:
    pos = torch.arange(len(locs))
    assert torch.equal(page_owner(locs // P, kvp), (pos // P) % kvp)
    assert torch.equal(locs % P, pos % P)


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("kvp", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp8"])
def test_retract_and_resume_restores_own_pages_bit_identical(kind, kvp, dtype):
    dtype = resolve(dtype)
    ranks = [Rank(kind, dtype, kvp, r) for r in range(kvp)]
    seqlen = 23  # prompt 13 + 10 decode steps; the backup covers seqlen - 1 = 22 tokens (6 pages)
    for rk in ranks:  # SPMD: the same stream on every rank
        rk.extend(1, 13)
        for s in range(14, seqlen):
            rk.decode(1, s)
        rk.extend(2, 9)
        rk.fill_random(seed=100 + rk.rank)
    n = seqlen - 1
    old = [rk.locs(1, n) for rk in ranks]
    assert all(torch.equal(o, old[0]) for o in old)  # identical ids on every rank
    check_colored_by_position(old[0], kvp)
    want = [rk.rows_of(old[0]) for rk in ranks]
    other = [rk.rows_of(rk.locs(2, 9)) for rk in ranks]

    # retract request 1: SGLang's backup, then its pages go back to the allocator
    reqs = [FakeReq(1, seqlen) for _ in ranks]
    for rk, req in zip(ranks, reqs):
        assert backup_kv_cache(req, None, rk.r2t, rk.alloc, "cpu_tensor")
        backup = req.kv.retraction_backup.cpu_tensors
        assert isinstance(backup, retraction.HelixKVBackup)
        owned = page_owner(old[0] // P, kvp) == rk.rank
        assert torch.equal(backup.owned, owned)  # only this rank's pages were copied out
        assert all(saved.shape[0] == int(owned.sum()) for saved in backup.tensors)
        rk.alloc.free(old[0])
        # another request takes (some of) the freed pages and writes over them
        rk.extend(3, 17)
        rows, own3 = rk.pool.local_rows(rk.locs(3, 17))
        for buf in rk.buffers():
            buf[rows[own3]] = buf[:1].expand_as(buf[rows[own3]])
        rk.r2t.req_to_token[1].zero_()

    # resume: fresh pages from position 0 (DecodePreallocQueue._pre_alloc), then SGLang's restore
    new = [rk.extend(1, n) for rk in ranks]
    assert all(torch.equal(x, new[0]) for x in new)
    check_colored_by_position(new[0], kvp)  # the coloring survives
    assert not torch.equal(new[0] // P, old[0] // P)  # really moved to other page ids
    for rk, req in zip(ranks, reqs):
        restore_kv_cache(req, None, rk.r2t, rk.alloc, "cpu_tensor")
        assert req.kv.retraction_backup is None
    for rk, rows_before, rows_other in zip(ranks, want, other):
        got = rk.rows_of(new[0])
        assert all(bit_equal(a, b) for a, b in zip(got, rows_before))  # atol=0
        assert all(bit_equal(a, b) for a, b in zip(rk.rows_of(rk.locs(2, 9)), rows_other))


def test_every_token_is_backed_up_on_exactly_one_rank():
    kvp, n = 3, 30
    ranks = [Rank("mha", torch.float32, kvp, r) for r in range(kvp)]
    locs = [rk.extend(1, n) for rk in ranks][0]
    backups = [rk.pool.get_cpu_copy(locs) for rk in ranks]
    owned = torch.stack([b.owned for b in backups]).to(torch.int64)
    assert torch.equal(owned.sum(0), torch.ones(n, dtype=torch.int64))


def test_restore_refuses_pages_of_another_color():
    kvp = 2
    rk = Rank("mha", torch.float32, kvp, 0)
    locs = rk.extend(1, 12)
    backup = rk.pool.get_cpu_copy(locs)
    shifted = rk.extend(2, 16)[P:]  # page j gets the id of page j + 1: colors swapped
    with pytest.raises(retraction.HelixRetractionError, match="not colored like the retracted ones"):
        rk.pool.load_cpu_copy(backup, shifted)
    with pytest.raises(retraction.HelixRetractionError, match="restore of 8 tokens, backup holds 12"):
        rk.pool.load_cpu_copy(backup, locs[:8])
    other = Rank("mha", torch.float32, kvp, 1)
    with pytest.raises(retraction.HelixRetractionError, match="KVP rank 0/2 restored on KVP rank 1/2"):
        other.pool.load_cpu_copy(backup, locs)
    with pytest.raises(retraction.HelixRetractionError, match="retraction-backup cpu_tensor"):
        rk.pool.load_cpu_copy([[torch.zeros(1)]], locs)


def test_restore_onto_the_same_pages_changes_no_byte():
    kvp = 2
    rk = Rank("mla", torch.float32, kvp, 1)
    rk.fill_random(seed=7)
    locs = rk.extend(1, 10)
    backup = rk.pool.get_cpu_copy(locs)
    before = [buf.clone() for buf in rk.buffers()]
    rk.pool.load_cpu_copy(backup, locs)  # same pages: a no-op, byte for byte
    assert all(bit_equal(a, b) for a, b in zip(rk.buffers(), before))


# ------------------------------------------------------------------ launch rule


def decode_view(backup):
    return SimpleNamespace(disaggregation_mode="decode", disaggregation_transfer_backend="mooncake",
                           disaggregation_decode_enable_offload_kvcache=False,
                           disaggregation_decode_host_receive_threshold=1.0,
                           disaggregation_decode_retraction_backup=backup)


def test_cpu_tensor_and_none_backups_accepted_host_pool_refused():
    from sglang_helix.rules.pd import check_pd
    from sglang_helix.rules.server import ServerLayout

    for backup in (None, "none", "cpu_tensor"):
        check_pd(ServerLayout.of(decode_view(backup)))
    with pytest.raises(HelixConfigError, match="--disaggregation-decode-retraction-backup host_pool") as err:
        check_pd(ServerLayout.of(decode_view("host_pool")))
    assert "--disaggregation-decode-retraction-backup cpu_tensor" in str(err.value)


# Every case in one fresh interpreter (the plugin's hooks are process-global): one resolution per
# case, its outcome printed as one JSON line.
RESOLVE_SCRIPT = """
import json, sys
from sglang_helix.srt.cpu import sgl_kernel_stub; sgl_kernel_stub.install()
from sglang_helix.srt import plugin; plugin.register()
from sglang.srt.plugins.hook_registry import HookRegistry; HookRegistry.apply_hooks()
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.server_args import prepare_server_args
out = {}
for name, flags in json.loads(sys.argv[2]).items():
    try:
        sa = prepare_server_args(["--model-path", sys.argv[1], "--tp-size", "2", "--enable-helix",
                                  "--helix-kvp-size", "2", "--page-size", "4", "--device", "cuda",
                                  "--attention-backend", "triton", "--disaggregation-mode", "decode",
                                  "--disaggregation-transfer-backend", "mooncake", *flags])
        sa.resolve_once()
        out[name] = "BACKUP " + str(resolved_view(sa).disaggregation_decode_retraction_backup)
    except Exception as exc:
        out[name] = f"ERROR {type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""
GPU_DECODE_CASES = {  # name: (flags, what the outcome starts with, what it contains)
    "default": ([], "BACKUP cpu_tensor", ""),  # SGLang alone would take host_pool for an MHA pool on GPU
    "none": (["--disaggregation-decode-retraction-backup", "none"], "BACKUP none", ""),
    "host_pool-refused": (["--disaggregation-decode-retraction-backup", "host_pool"],
                          "ERROR HelixConfigError", "--disaggregation-decode-retraction-backup cpu_tensor "
                          "(the Helix default"),
}


@pytest.fixture(scope="module")
def gpu_decode_resolutions(tmp_path_factory):
    """SGLang's argument resolution of each GPU PD decode launch (resolution only, no GPU used)."""
    import json
    import subprocess
    import sys

    model = tmp_path_factory.mktemp("tiny-llama")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_HELIX", "SGLANG_PLUGINS")}
    env.update(SGLANG_PLUGINS="none", SGLANG_USE_CPU_ENGINE="0", PYTHONUNBUFFERED="1")
    cases = json.dumps({name: flags for name, (flags, _, _) in GPU_DECODE_CASES.items()})
    proc = subprocess.run([sys.executable, "-c", RESOLVE_SCRIPT, str(model), cases], cwd=model,
                          env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("case", list(GPU_DECODE_CASES))
def test_gpu_decode_launch_resolves_the_helix_backup(gpu_decode_resolutions, case):
    """Helix's retraction backup default and refusal, as SGLang's own resolution applies them."""
    _, starts, contains = GPU_DECODE_CASES[case]
    outcome = gpu_decode_resolutions[case]
    assert outcome.startswith(starts) and contains in outcome, outcome
