"""Triton tiled (flash-style) attention with LSE for extend: the chunk's causal part and the
partial over this rank's paged prefix. Same contract as kernels/torch_extend.py (ground truth:
reference.attention_lse_ref): out fp32 [T, Hq, Dv], lse fp32 [T, Hq] natural log, out 0 and
lse -inf where a query sees no key.

Tiles. A program owns one query tile: BLOCK_T consecutive tokens of one request x BLOCK_H query
heads of one KV-head group, flattened to BLOCK_M = BLOCK_T * BLOCK_H rows (row r = token
r // BLOCK_H, head r % BLOCK_H), so the heads sharing a KV head share every key load (GQA groups;
MLA's one latent head). It walks key tiles of BLOCK_N with the base-2 online softmax of
triton_decode (nothing n x n is materialised) and reads each key, i.e. each prefix page, once.
- chunk (dense keys, causal within the request): key tiles wholly before the tile's first token
  run unmasked, the ones crossing the diagonal with the causal mask;
- prefix (paged keys): key n of request b is k_pages[page_table[b, n // P], n % P]; a request's
  local length may be 0 (no key tile: out 0, lse -inf) or end mid-page (masked).
The query tiles of a batch (request, first row, rows, position of the first row, key count) are
a host table built once per (lengths, tile size) by the pure `query_tiles` and cached on the
device, so the grid (tiles, KV heads, head blocks) is static for a given ExtendPlan.

Head dim. The dot q . k runs as two power-of-two parts: the largest power of two <= D, then the
rest (MLA: latent 512 + rope 64; small test dims 32 + 16); a power-of-two D is one part. When v
is a view of k's first Dv = part-one columns (MLA: the latent is the value), the values are the
part-one key tile already loaded (V_FROM_K), not a second read.

FP8 pages (kernels/kv_quant.py): key / value tiles load as fp8 and are upcast to the query's
dtype in registers; k_scale is folded into the softmax scale and v_scale multiplies the output.
Tile sizes stay those of the query dtype (the fp8 tiles simply stage half the bytes).

Launch parameters (block sizes, fp32 dot operands on the CPU interpreter, tl.dot precision,
warps/stages) live in the frozen `ExtendConfig`, `gpu()` / `cpu()` as triton_decode.TritonConfig.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_decode import LOG2E, _block, _dot, _online_step, _store_partial

_COLS = 5  # query-tile table columns: request, first row, rows, first position, key count


@triton.jit
def _extend_kernel(
    Q, K, V, PT, TILES, O, LSE,
    stride_qt, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ptb,
    stride_ot, stride_oh,
    stride_lt,
    scale_log2, v_scale, group, head_dim, head_dim_v,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    V_FROM_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (query tile, KV head, head block). PAGED: prefix over pages (no mask but the
    length); else the chunk's dense keys, causal. BLOCK_D2 == 0: one-part head dim."""
    pid_t = tl.program_id(0)
    pid_kh = tl.program_id(1)
    pid_hb = tl.program_id(2)
    req = tl.load(TILES + pid_t * 5)
    row0 = tl.load(TILES + pid_t * 5 + 1)
    rows = tl.load(TILES + pid_t * 5 + 2)
    pos0 = tl.load(TILES + pid_t * 5 + 3)
    klen = tl.load(TILES + pid_t * 5 + 4)

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // BLOCK_H
    g = pid_hb * BLOCK_H + offs_m % BLOCK_H
    mask_m = (tok < rows) & (g < group)
    head = pid_kh * group + g
    q_off = (row0 + tok).to(tl.int64) * stride_qt + head * stride_qh
    offs_d1 = tl.arange(0, BLOCK_D1)
    mask_d1 = offs_d1 < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < head_dim_v
    q1 = tl.load(Q + q_off[:, None] + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        mask_d2 = offs_d2 < head_dim
        q2 = tl.load(Q + q_off[:, None] + offs_d2[None, :], mask=mask_m[:, None] & mask_d2[None, :], other=0.0)
    else:
        offs_d2, mask_d2, q2 = offs_d1, mask_d1, q1  # unused

    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if PAGED:
        full_end, stop = 0, klen
    else:
        # Keys [0, full_end) precede every token of the tile: no causal mask there.
        full_end = (pos0 // BLOCK_N) * BLOCK_N
        stop = tl.minimum(klen, pos0 + rows)
    pos = pos0 + tok
    for n0 in range(0, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        if PAGED:
            page = tl.load(PT + req * stride_ptb + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            slot = offs_n % PAGE_SIZE
            k_tok = page * stride_kp + slot * stride_kt + pid_kh * stride_kh
            v_tok = page * stride_vp + slot * stride_vt + pid_kh * stride_vh
        else:
            key = (row0 - pos0 + offs_n).to(tl.int64)
            k_tok = key * stride_kt + pid_kh * stride_kh
            v_tok = key * stride_vt + pid_kh * stride_vh
        # fp8 pages: upcast per tile (a no-op otherwise)
        k1 = tl.load(K + k_tok[:, None] + offs_d1[None, :], mask=mask_n[:, None] & mask_d1[None, :],
                     other=0.0).to(q1.dtype)
        qk = _dot(q1, tl.trans(k1), DOT_PRECISION, UPCAST)
        if BLOCK_D2 > 0:
            k2 = tl.load(K + k_tok[:, None] + offs_d2[None, :], mask=mask_n[:, None] & mask_d2[None, :],
                         other=0.0).to(q2.dtype)
            qk += _dot(q2, tl.trans(k2), DOT_PRECISION, UPCAST)
        if V_FROM_K:
            v = k1
        else:
            v = tl.load(V + v_tok[:, None] + offs_dv[None, :], mask=mask_n[:, None] & mask_dv[None, :],
                        other=0.0).to(q1.dtype)
        qk2 = qk * scale_log2
        if not PAGED:
            if n0 + BLOCK_N > full_end:  # crosses the diagonal
                qk2 = tl.where(offs_n[None, :] <= pos[:, None], qk2, float("-inf"))
        # Every row (padding included) sees key 0, in the first tile: m2 stays finite.
        m2, s, acc = _online_step(qk2, mask_n, m2, s, acc, v, DOT_PRECISION, UPCAST)

    o_ptrs = O + (row0 + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    lse_ptrs = LSE + (row0 + tok).to(tl.int64) * stride_lt + head
    _store_partial(o_ptrs, mask_m[:, None] & mask_dv[None, :], lse_ptrs, mask_m, m2, s, acc * v_scale)


@dataclass(frozen=True)
class ExtendConfig:
    """Launch parameters of the extend kernel: everything that differs between CPU and GPU runs.

    block_m / block_n: query rows (tokens x heads of one KV head) per program and keys per loop
        step, for heads up to 256 wide; block_m_wide / block_n_wide for wider heads (MLA's
        512 + 64). Powers of two >= 16 (tl.dot's minimum). Sized for 2-byte operands: fp32 ones
        (GPU, upcast=False) step half as many keys, so the staged K/V tiles keep their bytes.
    block_h: most query heads of one KV head folded into a program's rows (the rest: more head
        blocks); a power of two <= every block_m.
    upcast, fp32_precision, num_warps, num_stages: as triton_decode.TritonConfig.
    GPU values: not timed on a GPU yet; chosen so that sm_90 ptxas (compiled on CPU) reports no
    register spills for bf16 prefix tiles at D=128 and at 512 + 64, and shared memory stays
    well under an H100's 227 KB for bf16 and fp32.
    """

    block_m: int = 128
    block_n: int = 64
    block_m_wide: int = 32
    block_n_wide: int = 32
    block_h: int = 16
    upcast: bool = False
    fp32_precision: str = "ieee"
    num_warps: int | None = 8
    num_stages: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_m_wide", "block_n_wide"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"ExtendConfig.{name}={value} must be a power of two >= 16")
        h = self.block_h
        if h < 1 or h & (h - 1) or h > min(self.block_m, self.block_m_wide):
            raise ValueError(f"ExtendConfig.block_h={self.block_h} must be a power of two <= block_m "
                             f"and block_m_wide")
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"ExtendConfig.fp32_precision={self.fp32_precision!r}; use ieee, tf32 or tf32x3")

    @classmethod
    def gpu(cls, **overrides) -> "ExtendConfig":
        """The CUDA parameter set."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "ExtendConfig":
        """The interpreter parameter set: 16-row / 16-key tiles, fp32 dot operands."""
        small = dict(block_m=16, block_n=16, block_m_wide=16, block_n_wide=16, upcast=True)
        return cls(**{**small, **overrides})

    def blocks(self, wide: bool, dtype: torch.dtype) -> tuple[int, int]:
        """(rows, keys) per program step for this head width and operand dtype."""
        block_m, block_n = (self.block_m_wide, self.block_n_wide) if wide else (self.block_m, self.block_n)
        if dtype == torch.float32 and not self.upcast:
            block_n = max(16, block_n // 2)
        return block_m, block_n

    def dot_precision(self, dtype: torch.dtype) -> str:
        return self.fp32_precision if dtype == torch.float32 else "tf32"

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {k: v for k, v in opts.items() if v is not None}


def config_for(device: torch.device) -> ExtendConfig:
    """ExtendConfig.gpu on CUDA, ExtendConfig.cpu elsewhere."""
    return ExtendConfig.gpu() if device.type == "cuda" else ExtendConfig.cpu()


def query_tiles(extend_lens, key_lens, tokens_per_tile: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """The query tiles of a batch (pure, host): per tile (request, first row in q, rows,
    position of the first row in its request, key count). key_lens: the request's own length
    (chunk) or its local prefix length. Requests with no new token have no tile."""
    tiles, row = [], 0
    for req, (n, keys) in enumerate(zip(extend_lens, key_lens)):
        tiles += [(req, row + p, min(tokens_per_tile, n - p), p, keys) for p in range(0, n, tokens_per_tile)]
        row += n
    return tuple(tiles)


@functools.lru_cache(maxsize=64)
def _tile_table(extend_lens: tuple, key_lens: tuple, tokens_per_tile: int, device: torch.device):
    """query_tiles as an int32 [tiles, 5] tensor on `device`; cached, so the layers of one plan
    share one host build and copy."""
    tiles = query_tiles(extend_lens, key_lens, tokens_per_tile)
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, _COLS).to(device)


def _head_parts(d: int) -> tuple[int, int]:
    """(BLOCK_D1, BLOCK_D2): the largest power of two <= D, then the rest padded (0: none)."""
    if d <= 16 or d & (d - 1) == 0:
        return _block(d), 0
    first = triton.next_power_of_2(d) // 2
    return first, _block(d - first)


def _values_in_keys(k: torch.Tensor, v: torch.Tensor, block_d1: int) -> bool:
    """v is k's first Dv columns (a view) and Dv is exactly part one's width: reuse the k tile."""
    dv, d1 = v.shape[-1], min(k.shape[-1], block_d1)
    return (v.data_ptr() == k.data_ptr() and v.shape[:-1] == k.shape[:-1]
            and v.stride()[:-1] == k.stride()[:-1] and dv == d1)


def _launch(q, k, v, page_table, extend_lens, key_lens, scale, paged, config, k_scale=1.0, v_scale=1.0):
    t, hq, d = q.shape
    kh, dv = k.shape[-2], v.shape[-1]
    cfg = config or config_for(q.device)
    out = torch.empty(t, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    block_d1, block_d2 = _head_parts(d)
    block_m, block_n = cfg.blocks(block_d1 + block_d2 > 256, q.dtype)
    group = hq // kh
    block_h = min(triton.next_power_of_2(group), cfg.block_h)
    tiles = _tile_table(tuple(extend_lens), tuple(key_lens), block_m // block_h, q.device)
    v_from_k = _values_in_keys(k, v, block_d1)
    if paged:
        strides_k, strides_v = k.stride()[:3], v.stride()[:3]
        pt = page_table.contiguous()
    else:
        strides_k, strides_v = (0, *k.stride()[:2]), (0, *v.stride()[:2])
        pt = tiles  # unread
    _extend_kernel[(tiles.shape[0], kh, triton.cdiv(group, block_h))](
        q, k, v, pt, tiles, out, lse,
        q.stride(0), q.stride(1),
        *strides_k,
        *strides_v,
        pt.stride(0),
        out.stride(0), out.stride(1),
        lse.stride(0),
        scale * k_scale * LOG2E, float(v_scale), group, d, dv,
        PAGED=paged,
        PAGE_SIZE=k.shape[1] if paged else 1,
        V_FROM_K=v_from_k,
        BLOCK_M=block_m,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D1=block_d1,
        BLOCK_D2=block_d2,
        BLOCK_DV=block_d1 if v_from_k else _block(dv),
        DOT_PRECISION=cfg.dot_precision(q.dtype),
        UPCAST=cfg.upcast,
        **cfg.launch_options(),
    )
    return out, lse


def chunk_attention_triton(q, k, v, extend_lens, scale, config=None, k_scale: float = 1.0,
                           v_scale: float = 1.0):
    """Causal attention of each request's chunk over itself, with the LSE.

    q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (Hq % Hk == 0; last dims contiguous; v may be a
    view of k's first Dv columns; k / v in q's dtype or fp8 with k_scale / v_scale);
    extend_lens: host ints summing to T. config: ExtendConfig (None: config_for).
    Returns out [T, Hq, Dv] fp32 and lse [T, Hq] fp32 natural log.
    """
    lens = tuple(int(n) for n in extend_lens)
    return _launch(q, k, v, None, lens, lens, scale, False, config, k_scale, v_scale)


def prefix_attention_triton(q, k_pages, v_pages, page_table, extend_lens, local_prefix_lens, scale,
                            config=None, k_scale: float = 1.0, v_scale: float = 1.0):
    """Partial attention of each request's rows over its local prefix pages, with the LSE.

    q [T, Hq, D]; k_pages [slots, P, Hk, D], v_pages [slots, P, Hk, Dv] (last dims contiguous;
    q's dtype or fp8 pages with k_scale / v_scale);
    page_table [B, pages] int32/int64 local slots (None if every local length is 0);
    extend_lens / local_prefix_lens: host ints per request. Returns out [T, Hq, Dv] fp32 (0 for
    a request with no local prefix token) and lse [T, Hq] fp32 (-inf there).
    """
    lens = tuple(int(n) for n in extend_lens)
    local = tuple(int(n) for n in local_prefix_lens)
    if not any(local):  # nothing on this rank: no launch
        out = torch.zeros(q.shape[0], q.shape[1], v_pages.shape[-1], dtype=torch.float32, device=q.device)
        return out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return _launch(q, k_pages, v_pages, page_table, lens, local, scale, True, config, k_scale, v_scale)
