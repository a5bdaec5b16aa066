#!/usr/bin/env python
"""One-command GPU check of the Helix kernels: correctness, HBM bandwidth, CUDA graphs, extend.

    python scripts/gpu_check.py                 # on a GPU machine (torch + triton suffice)
    python scripts/gpu_check.py --dry-run       # CPU, TRITON_INTERPRET=1, tiny sizes (the test)

Sections, each guarded so one failure does not stop the others:
  env        devices, versions, flashinfer / sgl-kernel ("not installed" when absent), the
             TritonConfig used (on CPU: the GPU parameter set, run by the interpreter);
  copy       device-to-device copy bandwidth (torch copy of a large buffer; read + write bytes);
  (a) correct Triton GQA / MLA partial attention (automatic split-KV and num_splits=1) and the
             merge vs the fp32 references (kernels/reference.py), bf16 / fp16 / fp32, ragged
             lengths and empty rows, unused cache slots poisoned with NaN; library kernels
             (flashinfer, FlashMLA) and impl="auto" too where they import;
  (b) bw     achieved bandwidth of partial attention = KV bytes read / kernel time (CUDA events,
             L2 flushed before every rep, warmup + median of reps) at 32K..1M tokens, batch 1..8,
             DeepSeek-V3 MLA (R=512+64, H=16 and 128) and Llama-70B GQA (K=8, D=128, H=64), as a
             fraction of the copy bandwidth (aim >= 70%; below it is reported, not failed,
             unless --strict-bandwidth);
  (c) graph  HelixAttention (KVP=1, LocalExchange, impl="triton"): plan, capture forward_mla /
             forward_gqa in torch.cuda.graph, re-plan other lengths into the same buffers,
             replay, compare with eager on the new lengths (bitwise expected; else fp tolerance)
             and with the fp32 reference. A failed capture is a FAIL row with the error text;
  (d) extend Triton extend attention (causal chunk, paged prefix partial; GQA and MLA shapes)
             vs the fp32 reference through sglang_helix.attention;
  (e) fp8 KV fp8 pages (e4m3 and e5m2, per-tensor k_scale 0.37 / v_scale 1.9, SGLang's
             convention) with bf16 queries: Triton GQA / MLA decode (split auto and 1 split),
             impl="auto" (flashinfer paged decode takes fp8 pages for GQA where it imports; the
             MLA libraries are offered bf16 pages only, so MLA auto is Triton) and the Triton
             extend prefix partial, vs the fp32 reference on the dequantized pages.
Ends with one markdown table (check, shape, result, figure), printed and written to --out.
Exit code 1 if any row is FAIL. On CPU the CUDA-only parts (events, graphs) are "skipped on CPU"
rows; everything else runs the same code on tiny sizes (perf_counter instead of events).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = {  # dtype name -> (out atol, out rtol, lse atol) vs the fp32 reference
    "bfloat16": (2.5e-2, 2.5e-2, 1e-3),
    "float16": (3e-3, 3e-3, 1e-3),
    "float32": (1e-4, 1e-4, 1e-4),  # input_precision="ieee"; tf32 operands (10-bit mantissa) miss it
}
BW_AIM = 0.70
MLA_R, MLA_DR = 512, 64
GQA_K, GQA_D, GQA_H = 8, 128, 64


@dataclasses.dataclass
class Row:
    check: str
    shape: str
    result: str  # PASS / FAIL / SKIP / INFO / BELOW AIM
    figure: str


class Report:
    def __init__(self):
        self.rows: list[Row] = []

    def add(self, check, shape, result, figure=""):
        row = Row(check, shape, result, " ".join(str(figure).split()))
        self.rows.append(row)
        print(f"[{row.result}] {row.check} | {row.shape} | {row.figure}", flush=True)

    def guard(self, check, shape, fn, *args, **kwargs):
        """Run fn; an exception becomes a FAIL row with its text, never a crash."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is a reported row
            traceback.print_exc()
            self.add(check, shape, "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}")
            return None

    def failed(self) -> bool:
        return any(r.result == "FAIL" for r in self.rows)

    def markdown(self) -> str:
        cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| check | shape | result | figure |", "| --- | --- | --- | --- |"]
        lines += [f"| {cell(r.check)} | {cell(r.shape)} | {cell(r.result)} | {cell(r.figure)} |" for r in self.rows]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- arithmetic


def kv_bytes_per_token(kind: str, itemsize: int, kv_heads: int = GQA_K, head_dim: int = GQA_D) -> int:
    """Bytes of KV one token costs: GQA K and V of every KV head; MLA the latent + rope row."""
    if kind == "mla":
        return (MLA_R + MLA_DR) * itemsize
    return 2 * kv_heads * head_dim * itemsize


def bandwidth(bytes_moved: int, ms: float) -> float:
    """Bytes per second."""
    return bytes_moved / (ms * 1e-3)


def fmt_bw(bps: float) -> str:
    return f"{bps / 1e12:.3f} TB/s" if bps >= 1e11 else f"{bps / 1e9:.3f} GB/s"


def ctx_label(n: int) -> str:
    return f"{n // (1 << 20)}M" if n % (1 << 20) == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def compare(out, lse, ref_out, ref_lse, dtype_name: str):
    """(ok, figure): out (and lse unless None) vs the fp32 reference; the reference's empty rows
    (lse -inf) must be exactly out 0 / lse -inf; no NaN anywhere."""
    import torch  # noqa: PLC0415

    out, ref_out, ref_lse = out.float(), ref_out.float(), ref_lse.float()
    atol, rtol, lse_atol = TOL[dtype_name]
    empty = torch.isinf(ref_lse)
    problems = []
    if torch.isnan(out).any() or (lse is not None and torch.isnan(lse).any()):
        problems.append("NaN in output")
    if lse is not None and not torch.equal(torch.isneginf(lse), empty):
        problems.append("-inf rows differ from the empty rows")
    if empty.any() and (out[empty] != 0).any():
        problems.append("empty rows not 0")
    d_out = (out - ref_out).abs()
    err_out = float(d_out.max()) if d_out.numel() else 0.0
    if d_out.numel() and not bool((d_out <= atol + rtol * ref_out.abs()).all()):
        problems.append("out beyond tolerance")
    figure = f"max|dout| {err_out:.2e}"
    if lse is not None:
        live = ~empty
        err_lse = float((lse.float()[live] - ref_lse[live]).abs().max()) if live.any() else 0.0
        if err_lse > lse_atol:
            problems.append("lse beyond tolerance")
        figure += f", max|dlse| {err_lse:.2e}"
    figure += f" (tol {atol:g}+{rtol:g}rel" + (f", lse {lse_atol:g})" if lse is not None else ")")
    return not problems, figure + ("; " + "; ".join(problems) if problems else "")


# ----------------------------------------------------------------------------- problems


def paged_pool(lens, page_size, token_shape, dtype, device, gen, spare=2):
    """Shuffled-page cache of len(lens) requests; tail slots and spare pages NaN.

    Returns cache [pages, P, *token_shape], table [B, max_pages + 1] int32 (entries past a
    request's pages point at a NaN spare page: valid addresses, poisoned values), lens int32.
    """
    import torch  # noqa: PLC0415

    n_pages = [-(-n // page_size) for n in lens]
    total = sum(n_pages) + spare
    cache = torch.randn(total, page_size, *token_shape, generator=gen, device=device).to(dtype)
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)
    poison = perm[total - spare:]
    cache[poison.long()] = float("nan")
    table = poison[0].repeat(len(lens), max(n_pages, default=0) + 1).contiguous()
    used = 0
    for b, (n, np_) in enumerate(zip(lens, n_pages)):
        table[b, :np_] = perm[used:used + np_]
        used += np_
        if n % page_size:
            cache[int(perm[used - 1]), n % page_size:] = float("nan")
    return cache, table, torch.tensor(lens, dtype=torch.int32, device=device)


def gqa_problem(lens, page_size, hq, kh, d, dtype, device, seed):
    import torch  # noqa: PLC0415

    gen = torch.Generator(device=device).manual_seed(seed)
    kv, table, sl = paged_pool(lens, page_size, (kh, 2 * d), dtype, device, gen)
    q = torch.randn(len(lens), hq, d, generator=gen, device=device).to(dtype)
    return q, kv[..., :d].contiguous(), kv[..., d:].contiguous(), table, sl


def mla_problem(lens, page_size, heads, dtype, device, seed, rank_r=MLA_R, rope=MLA_DR):
    import torch  # noqa: PLC0415

    gen = torch.Generator(device=device).manual_seed(seed)
    kv, table, sl = paged_pool(lens, page_size, (rank_r + rope,), dtype, device, gen)
    ql = torch.randn(len(lens), heads, rank_r, generator=gen, device=device).to(dtype)
    qr = torch.randn(len(lens), heads, rope, generator=gen, device=device).to(dtype)
    return ql, qr, kv, table, sl


# ----------------------------------------------------------------------------- (a) correctness


def correctness(rep: Report, device, cfg, quick: bool):
    import torch  # noqa: PLC0415

    if quick:
        gqa_cases = [(4, 2, 128, 16, [0, 1, 17, 300])]
        mla_cases = [(16, 16, [0, 5, 300])]
        merge_cases = [(3, 2, 4, 512)]
    else:
        gqa_cases = [(8, 1, 128, 64, [0, 1, 63, 64, 1000, 4099]), (64, 8, 128, 64, [0, 17, 3000, 5000]),
                     (16, 2, 128, 16, [5, 0, 700])]
        mla_cases = [(16, 64, [0, 1, 65, 3000, 5000]), (128, 64, [0, 33, 4096])]
        merge_cases = [(2, 3, 16, 512), (8, 4, 128, 512)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).split(".")[-1]
        for hq, kh, d, page, lens in gqa_cases:
            shape = f"GQA Hq={hq} K={kh} D={d} P={page} lens={lens} {name}"
            rep.guard("(a) GQA", shape, _gqa_case, rep, device, cfg, hq, kh, d, page, lens, dtype, shape)
        for heads, page, lens in mla_cases:
            shape = f"MLA H={heads} R={MLA_R}+{MLA_DR} P={page} lens={lens} {name}"
            rep.guard("(a) MLA", shape, _mla_case, rep, device, cfg, heads, page, lens, dtype, shape)
        for shards, bsz, heads, dv in merge_cases:
            shape = f"merge S={shards} B={bsz} H={heads} Dv={dv} {name}"
            rep.guard("(a) triton merge", shape, _merge_case, rep, device, shards, bsz, heads, dv, dtype, shape)


def _gqa_case(rep: Report, device, cfg, hq, kh, d, page, lens, dtype, shape):
    import torch  # noqa: PLC0415

    from sglang_helix import attention  # noqa: PLC0415
    from sglang_helix.kernels import gpu, reference  # noqa: PLC0415
    from sglang_helix.kernels.triton_decode import gqa_partial_triton  # noqa: PLC0415

    q, kc, vc, pt, sl = gqa_problem(lens, page, hq, kh, d, dtype, device, seed=hq + d)
    scale = d ** -0.5
    impls = {"triton split auto": lambda: gqa_partial_triton(q, kc, vc, pt, sl, scale, config=cfg),
             "triton 1 split": lambda: gqa_partial_triton(q, kc, vc, pt, sl, scale, 1, config=cfg)}
    if gpu.flashinfer_gqa_available(q, kc, vc):
        impls["flashinfer"] = lambda: gpu.gqa_partial_flashinfer(q, kc, vc, pt, sl, scale)
    if device.type == "cuda" and dtype != torch.float32:
        impls["attention impl=auto"] = lambda: attention.partial_attention_gqa(q, kc, vc, pt, sl, scale)
    splits = cfg.splits(len(lens) * kh, pt.shape[1] * page)
    _check_impls(rep, shape, impls, reference.gqa_partial_ref(q, kc, vc, pt, sl, scale), dtype, splits)


def _mla_case(rep: Report, device, cfg, heads, page, lens, dtype, shape):
    import torch  # noqa: PLC0415

    from sglang_helix import attention  # noqa: PLC0415
    from sglang_helix.kernels import gpu, reference  # noqa: PLC0415
    from sglang_helix.kernels.triton_decode import mla_partial_triton  # noqa: PLC0415

    ql, qr, kv, pt, sl = mla_problem(lens, page, heads, dtype, device, seed=heads)
    scale = 192 ** -0.5  # DeepSeek-V3: qk head dim 128 + 64
    impls = {"triton split auto": lambda: mla_partial_triton(ql, qr, kv, pt, sl, scale, config=cfg),
             "triton 1 split": lambda: mla_partial_triton(ql, qr, kv, pt, sl, scale, 1, config=cfg)}
    if gpu.flashinfer_mla_available(ql, qr, kv):
        impls["flashinfer mla"] = lambda: gpu.mla_partial_flashinfer(ql, qr, kv, pt, sl, scale)
    if gpu.flashmla_available(ql, qr, kv):
        impls["FlashMLA (sgl-kernel)"] = lambda: gpu.mla_partial_flashmla(ql, qr, kv, pt, sl, scale)
    if device.type == "cuda" and dtype != torch.float32:
        impls["attention impl=auto"] = lambda: attention.partial_attention_mla(ql, qr, kv, pt, sl, scale)
    splits = cfg.splits(len(lens) * -(-heads // cfg.block_h_mla), pt.shape[1] * page)
    _check_impls(rep, shape, impls, reference.mla_partial_ref(ql, qr, kv, pt, sl, scale), dtype, splits)


def _merge_case(rep: Report, device, shards, bsz, heads, dv, dtype, shape):
    import torch  # noqa: PLC0415

    from sglang_helix.kernels import reference  # noqa: PLC0415
    from sglang_helix.kernels.triton_merge import merge_triton  # noqa: PLC0415

    gen = torch.Generator(device=device).manual_seed(shards)
    outs = torch.randn(shards, bsz, heads, dv, generator=gen, device=device).to(dtype)
    lses = torch.randn(shards, bsz, heads, generator=gen, device=device) * 4
    lses[0, 0] = float("-inf")  # an empty shard
    lses[:, -1, -1] = float("-inf")  # a row with every shard empty
    outs[:, -1, -1] = 0
    _check_impls(rep, shape, {"triton merge": lambda: merge_triton(outs, lses)}, reference.merge_ref(outs, lses),
                 dtype)


def _check_impls(rep: Report, shape: str, impls: dict, want, dtype, splits=None):
    name = str(dtype).split(".")[-1]
    for label, fn in impls.items():
        def run(fn=fn, label=label):
            out, lse = fn()
            ok, figure = compare(out, lse, want[0], want[1], name)
            if splits is not None and label == "triton split auto":
                figure += f" (splits {splits})"
            rep.add(f"(a) {label}", shape, "PASS" if ok else "FAIL", figure)

        rep.guard(f"(a) {label}", shape, run)


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median ms of fn over reps after warmup. CUDA: events around each call, an L2 flush before
    each (it also keeps the GPU busy while the CPU enqueues, so launch overhead is not timed).
    CPU: perf_counter (dry-run arithmetic only; not a bandwidth figure)."""

    def __init__(self, device, warmup: int, reps: int):
        import torch  # noqa: PLC0415

        self.device, self.warmup, self.reps = device, warmup, reps
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def ms(self, fn) -> float:
        import torch  # noqa: PLC0415

        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        pairs = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


def copy_bandwidth(rep: Report, device, timer: Timer, quick: bool) -> float | None:
    import torch  # noqa: PLC0415

    size = (16 << 20) if quick else (2 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    bps = bandwidth(2 * size, ms)  # read + write
    result = "INFO" if timer.cuda else "INFO (CPU timer)"
    rep.add("copy bandwidth (d2d, read+write)", f"{size >> 20} MiB", result, f"{ms * 1e3:.1f} us, {fmt_bw(bps)}")
    return bps


# ----------------------------------------------------------------------------- (b) bandwidth


def bandwidth_section(rep: Report, device, cfg, timer: Timer, copy_bps, quick: bool, deadline: float,
                      strict: bool):
    import torch  # noqa: PLC0415

    if not timer.cuda:
        rep.add("(b) bandwidth timing (CUDA events)", "-", "SKIP", "skipped on CPU: perf_counter "
                "timings below exercise the arithmetic only")
    page = 16 if quick else 64
    ctxs = [256, 1024] if quick else [32 << 10, 128 << 10, 512 << 10, 1 << 20]
    batches = [1, 2] if quick else [1, 2, 4, 8]
    shapes = [("mla", 16), ("gqa", 16)] if quick else [("mla", 16), ("mla", 128), ("gqa", GQA_H)]
    kh = 2 if quick else GQA_K
    for kind, heads in shapes:
        label = f"{kind.upper()} H={heads}" + (f" K={kh} D={GQA_D}" if kind == "gqa" else f" R={MLA_R}+{MLA_DR}")
        rep.guard("(b) bandwidth", label, _bw_shape, rep, device, cfg, timer, copy_bps, kind, heads, kh, page,
                  ctxs, batches, label, deadline, strict)
        if timer.cuda:
            torch.cuda.empty_cache()  # this shape's pool goes back to the driver


def _bw_shape(rep: Report, device, cfg, timer: Timer, copy_bps, kind, heads, kh, page, ctxs, batches, label,
              deadline, strict):
    """One model shape: one KV pool for the largest case, every (context, batch) reads from it."""
    import torch  # noqa: PLC0415

    from sglang_helix.kernels import gpu  # noqa: PLC0415
    from sglang_helix.kernels.triton_decode import gqa_partial_triton, mla_partial_triton  # noqa: PLC0415

    dtype = torch.bfloat16
    per_tok = kv_bytes_per_token(kind, 2, kh, GQA_D)
    total_pages = max(batches) * (max(ctxs) // page) + 1
    need = total_pages * page * per_tok
    if timer.cuda:
        torch.cuda.empty_cache()  # the copy buffers / the last pool go back to the driver
        if need + (1 << 30) > torch.cuda.mem_get_info(device)[0]:
            rep.add("(b) bandwidth", label, "SKIP", f"needs {need / 2**30:.1f} GiB of KV pool")
            return
    if kind == "mla":
        pool = torch.empty(total_pages, page, MLA_R + MLA_DR, dtype=dtype, device=device).normal_()
    else:
        kv = torch.empty(2, total_pages, page, kh, GQA_D, dtype=dtype, device=device).normal_()
        kc, vc = kv[0], kv[1]
    gen = torch.Generator(device=device).manual_seed(0)
    for ctx in ctxs:
        for bsz in batches:
            shape = f"{label} ctx={ctx_label(ctx)} B={bsz} bf16 P={page}"
            if time.monotonic() > deadline:
                rep.add("(b) bandwidth", shape, "SKIP", "time budget spent (--budget-s)")
                continue
            n = ctx // page
            table = torch.randperm(total_pages, generator=gen, device=device)[: bsz * n]
            table = table.view(bsz, n).to(torch.int32)  # distinct pages, shuffled
            sl = torch.full((bsz,), ctx, dtype=torch.int32, device=device)
            if kind == "mla":
                ql = torch.randn(bsz, heads, MLA_R, device=device, dtype=dtype)
                qr = torch.randn(bsz, heads, MLA_DR, device=device, dtype=dtype)
                fns = {"triton": lambda: mla_partial_triton(ql, qr, pool, table, sl, 0.07, config=cfg)}
                programs = bsz * math.ceil(heads / cfg.block_h_mla)
                if gpu.flashinfer_mla_available(ql, qr, pool):
                    fns["flashinfer"] = lambda: gpu.mla_partial_flashinfer(ql, qr, pool, table, sl, 0.07)
                if gpu.flashmla_available(ql, qr, pool):
                    fns["FlashMLA"] = lambda: gpu.mla_partial_flashmla(ql, qr, pool, table, sl, 0.07)
            else:
                q = torch.randn(bsz, heads, GQA_D, device=device, dtype=dtype)
                fns = {"triton": lambda: gqa_partial_triton(q, kc, vc, table, sl, 0.088, config=cfg)}
                programs = bsz * kh
                if gpu.flashinfer_gqa_available(q, kc, vc):
                    fns["flashinfer"] = lambda: gpu.gqa_partial_flashinfer(q, kc, vc, table, sl, 0.088)
            splits = cfg.splits(programs, n * page)
            for impl, fn in fns.items():
                rep.guard(f"(b) bandwidth {impl}", shape, _bw_row, rep, impl, shape, fn, timer,
                          bsz * ctx * per_tok, copy_bps, splits if impl == "triton" else None, strict)


def _bw_row(rep: Report, impl, shape, fn, timer: Timer, kv_bytes: int, copy_bps, splits, strict):
    ms = timer.ms(fn)
    bps = bandwidth(kv_bytes, ms)
    frac = bps / copy_bps if copy_bps else float("nan")
    fig = f"{ms * 1e3:.1f} us, {fmt_bw(bps)} = {frac:.1%} of copy" + (f" (splits {splits})" if splits else "")
    if not timer.cuda:
        result = "INFO (CPU timer)"
    elif frac >= BW_AIM:
        result = "PASS"
    else:
        result = "FAIL" if strict else "BELOW AIM"
    rep.add(f"(b) bandwidth {impl}", shape, result, fig)


# ----------------------------------------------------------------------------- (c) CUDA graph


def graph_section(rep: Report, device, quick: bool):
    if device.type != "cuda":
        rep.add("(c) CUDA graph capture + replay", "-", "SKIP", "skipped on CPU: eager re-plan only")
    if quick:
        cases = [("mla", 16, 16, 1, [300, 0, 40], [7, 290, 0]), ("gqa", 4, 16, 2, [0, 33, 300], [310, 5, 0])]
    else:
        cases = [("mla", 128, 64, 1, [3000, 0, 64, 777], [5000, 1, 0, 4096]),
                 ("gqa", GQA_H, 64, 1, [3000, 0, 64, 777], [5000, 1, 0, 4096]),
                 ("gqa", GQA_H, 64, 2, [100, 4000, 0, 2049], [0, 4999, 64, 1])]
    for kind, heads, page, slices, lens_a, lens_b in cases:
        shape = f"{kind.upper()} H={heads} P={page} HOP-B {slices} lens {lens_a} -> {lens_b} bf16"
        rep.guard("(c) CUDA graph", shape, _graph_case, rep, device, kind, heads, page, slices, lens_a, lens_b,
                  shape)


def _graph_case(rep: Report, device, kind, heads, page, slices, lens_a, lens_b, shape):
    import torch  # noqa: PLC0415

    from sglang_helix.config import HelixConfig  # noqa: PLC0415
    from sglang_helix.decode import HelixAttention  # noqa: PLC0415
    from sglang_helix.kernels import reference  # noqa: PLC0415

    dtype, bsz, mla = torch.bfloat16, len(lens_a), kind == "mla"
    kh = 1 if mla else (2 if heads <= 16 else GQA_K)
    max_pages = max(-(-n // page) for n in lens_a + lens_b) + 1
    total = 2 * bsz * max_pages
    gen = torch.Generator(device=device).manual_seed(7)
    if mla:
        kv = torch.randn(total, page, MLA_R + MLA_DR, generator=gen, device=device).to(dtype)
        qs = [torch.randn(bsz, heads, MLA_R, generator=gen, device=device).to(dtype),
              torch.randn(bsz, heads, MLA_DR, generator=gen, device=device).to(dtype)]
        caches, scale = (kv,), 192 ** -0.5
    else:
        kv = torch.randn(2, total, page, kh, GQA_D, generator=gen, device=device).to(dtype)
        qs = [torch.randn(bsz, heads, GQA_D, generator=gen, device=device).to(dtype)]
        caches, scale = (kv[0], kv[1]), GQA_D ** -0.5
    cfg = HelixConfig(kvp=1, tpa=1, num_heads=heads, num_kv_heads=kh, mla=mla, page_size=page, hopb_slices=slices)
    attn = HelixAttention(cfg, 0, None, max_batch=bsz, max_local_pages=max_pages, kernels="triton", device=device)
    forward = attn.forward_mla if mla else attn.forward_gqa
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)

    def plan(lens, offset):
        table = perm[offset * bsz * max_pages:(offset + 1) * bsz * max_pages].view(bsz, max_pages)
        attn.plan(torch.tensor(lens, dtype=torch.int32, device=device), table)
        return table, torch.tensor(lens, dtype=torch.int32, device=device)

    def ref(table, sl):
        fn = reference.mla_partial_ref if mla else reference.gqa_partial_ref
        return fn(*qs, *caches, table, sl, scale)

    run = lambda: forward(*qs, *caches, scale)  # noqa: E731
    plan(lens_a, 0)
    eager_a = run()
    if device.type != "cuda":
        table_b, sl_b = plan(lens_b, 1)
        want = ref(table_b, sl_b)
        ok, fig = compare(run(), None, want[0], want[1], "bfloat16")
        rep.add("(c) eager re-plan vs fp32 reference", shape, "PASS" if ok else "FAIL", fig)
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up outside the capture (compiles, allocator pools)
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = run()
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        rep.add("(c) CUDA graph capture", shape, "FAIL", f"capture failed: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the row above already says what broke
            pass
        return
    graph.replay()
    torch.cuda.synchronize(device)
    same_a = torch.equal(static_out, eager_a)
    table_b, sl_b = plan(lens_b, 1)
    for t in qs:  # new queries too, into the captured input buffers
        t.copy_(torch.randn(t.shape, generator=gen, device=device).to(dtype))
    graph.replay()
    torch.cuda.synchronize(device)
    replayed = static_out.clone()
    eager_b = run()
    want = ref(table_b, sl_b)
    bitwise = torch.equal(replayed, eager_b)
    ok_ref, fig_ref = compare(replayed, None, want[0], want[1], "bfloat16")
    if bitwise and same_a:
        result, fig = "PASS", "exact: replay == eager bitwise (capture lengths and re-planned lengths)"
    else:
        diff = float((replayed.float() - eager_b.float()).abs().max())
        ok_tol, _ = compare(replayed, None, eager_b, want[1], "bfloat16")
        result = "PASS" if ok_tol else "FAIL"
        fig = (f"not bitwise (capture lengths {'equal' if same_a else 'differ'}): re-planned max|replay - eager| "
               f"{diff:.2e}, bf16 tolerance {'met' if ok_tol else 'missed'}")
    rep.add("(c) CUDA graph replay vs eager", shape, result, fig)
    rep.add("(c) CUDA graph replay vs fp32 reference", shape, "PASS" if ok_ref else "FAIL", fig_ref)


# ----------------------------------------------------------------------------- main


def extend_section(rep: Report, device, quick: bool):
    """(d) Triton extend (chunk causal + paged prefix partial) vs the fp32 reference."""
    import torch  # noqa: PLC0415

    cases = [("GQA", 8, 2, 128, 128)] + ([] if quick else [("MLA", 16, 1, MLA_R + MLA_DR, MLA_R)])
    for dtype in (torch.bfloat16, torch.float32):
        for kind, hq, kh, d, dv in cases:
            shape = f"{kind} Hq={hq} K={kh} D={d} Dv={dv} {str(dtype).split('.')[-1]}"
            rep.guard("(d) extend", shape, _extend_case, rep, device, hq, kh, d, dv, dtype, shape, quick)


def _extend_case(rep: Report, device, hq, kh, d, dv, dtype, shape, quick: bool):
    import torch  # noqa: PLC0415

    from sglang_helix.attention import chunk_attention_lse, prefix_attention_lse  # noqa: PLC0415
    from sglang_helix.dev.paged import build_local_paged_cache  # noqa: PLC0415
    from sglang_helix.metadata import plan_extend  # noqa: PLC0415

    page, kvp = 16, 2
    chunks, prefixes = ([5, 33], [0, 70]) if quick else ([64, 300, 7], [0, 1000, 4099])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sum(chunks), hq, d, generator=gen).to(device, dtype)
    k = torch.randn(sum(chunks), kh, d, generator=gen).to(device, dtype)
    v = (k[..., :dv] if dv < d else torch.randn(sum(chunks), kh, dv, generator=gen).to(device, dtype))
    seqs = [torch.randn(max(p, 1), kh, d + dv, generator=gen).to(dtype) for p in prefixes]
    cache, table = build_local_paged_cache(seqs, page, kvp, 1)
    cache, table = cache.to(device), table.to(device)
    plan = plan_extend(chunks, prefixes, 1, page, kvp, local_tables=lambda _: (table, None))
    kp, vp = cache[..., :d], cache[..., d:]
    for part, fn in (("chunk", lambda impl: chunk_attention_lse(q, k, v, chunks, 0.1, impl=impl)),
                     ("prefix", lambda impl: prefix_attention_lse(q, kp, vp, plan, 0.1, impl=impl))):
        out, lse = fn("triton")
        ref_out, ref_lse = fn("reference")
        ok, figure = compare(out, lse, ref_out, ref_lse, str(dtype).split(".")[-1])
        rep.add(f"(d) triton extend {part}", shape, "PASS" if ok else "FAIL", figure)


def fp8_section(rep: Report, device, cfg, quick: bool):
    """(e) fp8 KV pages read by the kernels vs the fp32 reference on the dequantized pages."""
    import torch  # noqa: PLC0415

    gqa = [(8, 2, 128, 16, [0, 17, 300])] if quick else [(64, 8, 128, 64, [0, 17, 3000, 5000])]
    mla = [(16, 16, [0, 5, 300])] if quick else [(128, 64, [0, 33, 4096])]
    for kv in (torch.float8_e4m3fn, torch.float8_e5m2):
        name = str(kv).split(".")[-1]
        for hq, kh, d, page, lens in gqa:
            shape = f"GQA Hq={hq} K={kh} D={d} P={page} lens={lens} bf16 q, {name} pages"
            rep.guard("(e) fp8 GQA", shape, _fp8_case, rep, device, cfg, "gqa", (hq, kh, d), page, lens, kv, shape)
        for heads, page, lens in mla:
            shape = f"MLA H={heads} R={MLA_R}+{MLA_DR} P={page} lens={lens} bf16 q, {name} pages"
            rep.guard("(e) fp8 MLA", shape, _fp8_case, rep, device, cfg, "mla", (heads,), page, lens, kv, shape)


def _fp8_case(rep: Report, device, cfg, kind, dims, page, lens, kv_dtype, shape):
    import torch  # noqa: PLC0415

    from sglang_helix import attention  # noqa: PLC0415
    from sglang_helix.kernels import kv_quant, reference  # noqa: PLC0415
    from sglang_helix.kernels.triton_decode import gqa_partial_triton, mla_partial_triton  # noqa: PLC0415
    from sglang_helix.metadata import plan_extend  # noqa: PLC0415

    ks, vs = 0.37, 1.9
    sc = dict(k_scale=ks, v_scale=vs)
    if kind == "gqa":
        hq, kh, d = dims
        q, kc, vc, pt, sl = gqa_problem(lens, page, hq, kh, d, torch.bfloat16, device, seed=hq + d)
        kc, vc = kv_quant.quantize(kc.float(), kv_dtype, ks), kv_quant.quantize(vc.float(), kv_dtype, vs)
        scale = d ** -0.5
        want = reference.gqa_partial_ref(q, kv_quant.dequantize(kc, ks), kv_quant.dequantize(vc, vs), pt, sl, scale)
        impls = {"triton split auto": lambda: gqa_partial_triton(q, kc, vc, pt, sl, scale, config=cfg, **sc),
                 "triton 1 split": lambda: gqa_partial_triton(q, kc, vc, pt, sl, scale, 1, config=cfg, **sc)}
        if device.type == "cuda":
            impls["attention impl=auto"] = lambda: attention.partial_attention_gqa(q, kc, vc, pt, sl, scale, **sc)
        # the extend prefix partial over the same pages: one request per decode row, 3 queries each
        qx = q.repeat_interleave(3, dim=0)
        keys, vals = kc, vc
    else:
        (heads,) = dims
        ql, qr, kv, pt, sl = mla_problem(lens, page, heads, torch.bfloat16, device, seed=heads)
        kv = kv_quant.quantize(kv.float(), kv_dtype, ks)
        scale = 192 ** -0.5
        out, lse = reference.mla_partial_ref(ql, qr, kv_quant.dequantize(kv, ks), pt, sl, scale)
        want = (out * (vs / ks), lse)  # values read with v_scale (SGLang's MLA read)
        impls = {"triton split auto": lambda: mla_partial_triton(ql, qr, kv, pt, sl, scale, config=cfg, **sc),
                 "triton 1 split": lambda: mla_partial_triton(ql, qr, kv, pt, sl, scale, 1, config=cfg, **sc)}
        if device.type == "cuda":
            impls["attention impl=auto"] = lambda: attention.partial_attention_mla(ql, qr, kv, pt, sl, scale, **sc)
        qx = torch.cat([ql, qr], -1).repeat_interleave(3, dim=0)
        keys, vals = kv.unsqueeze(2), kv[..., :MLA_R].unsqueeze(2)
    for label, fn in impls.items():
        out, lse = fn()
        ok, figure = compare(out, lse, want[0], want[1], "bfloat16")
        rep.add(f"(e) fp8 {label}", shape, "PASS" if ok else "FAIL", figure)
    plan = plan_extend([3] * len(lens), [int(n) for n in lens], 0, page, 1, local_tables=lambda _: (pt, None))
    run = lambda impl: attention.prefix_attention_lse(qx, keys, vals, plan, scale, impl=impl, **sc)  # noqa: E731
    ref_out, ref_lse = run("reference")
    out, lse = run("triton")
    ok, figure = compare(out, lse, ref_out, ref_lse, "bfloat16")
    rep.add("(e) fp8 triton extend prefix", shape, "PASS" if ok else "FAIL", figure)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU dry-run uses these)")
    p.add_argument("--dry-run", action="store_true", help="= --quick --device cpu under TRITON_INTERPRET=1")
    p.add_argument("--out", default="gpu_check.md", help="markdown table file (default gpu_check.md)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; bandwidth cases past it (less 60 s kept for the graphs) are skipped")
    p.add_argument("--strict-bandwidth", action="store_true", help="bandwidth below 70%% of copy is a FAIL")
    p.add_argument("--triton", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TritonConfig overrides, e.g. num_warps=8 block_n_mla=64")
    args = p.parse_args(argv)
    if args.dry_run:
        args.quick, args.device = True, "cpu"
    return args


def _env_row(rep: Report, device, cfg):
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        dev = f"{prop.name}, {prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        dev = f"CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    rep.add("env device", dev, "INFO", f"torch {torch.__version__}, triton {triton.__version__}")
    for mod, label in (("flashinfer", "flashinfer"), ("sgl_kernel", "sgl-kernel")):
        try:
            version = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: not usable either way
            version = "not installed"
        rep.add(f"env {label}", "-", "INFO", version)
    rep.add("env TritonConfig", "GPU parameter set" if cfg.num_sms else "CPU parameter set", "INFO",
            repr(cfg).replace("TritonConfig", ""))


def _config(device, overrides):
    from sglang_helix.kernels.triton_decode import TritonConfig, config_for  # noqa: PLC0415

    base = config_for(device) if device.type == "cuda" else TritonConfig.gpu()
    fields = {f.name: f.type for f in dataclasses.fields(TritonConfig)}
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--triton {item}: unknown field; choose from {', '.join(fields)}")
        changes[key] = None if value == "None" else (value if key == "fp32_precision" else int(value))
    return dataclasses.replace(base, **changes)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch  # noqa: PLC0415

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":  # before the kernels are imported: triton.jit reads it at decoration
        os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("sglang_helix") is None:
        sys.path.insert(0, str(ROOT))
    from sglang_helix.kernels.triton_decode import interpreter_bf16_dot  # noqa: PLC0415

    start = time.monotonic()
    deadline = start + args.budget_s - 60.0
    rep = Report()
    cfg = _config(device, args.triton)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        ctx = contextlib.nullcontext()
    else:  # the GPU parameter set (upcast=False) on bf16 needs the interpreter's dot fixed
        ctx = interpreter_bf16_dot()
    with ctx:
        rep.guard("env", "-", _env_row, rep, device, cfg)
        timer = Timer(device, warmup=1 if args.quick else 3, reps=2 if args.quick else 10)
        copy_bps = rep.guard("copy bandwidth", "-", copy_bandwidth, rep, device, timer, args.quick)
        rep.guard("(a) correctness", "-", correctness, rep, device, cfg, args.quick)
        rep.guard("(b) bandwidth", "-", bandwidth_section, rep, device, cfg, timer, copy_bps, args.quick,
                  deadline, args.strict_bandwidth)
        rep.guard("(c) CUDA graph", "-", graph_section, rep, device, args.quick)
        rep.guard("(d) extend", "-", extend_section, rep, device, args.quick)
        rep.guard("(e) fp8 KV", "-", fp8_section, rep, device, cfg, args.quick)
    fails = sum(r.result == "FAIL" for r in rep.rows)
    table = rep.markdown()
    summary = (f"\n{len(rep.rows)} rows, {fails} FAIL, {time.monotonic() - start:.0f} s on {device} "
               f"(`python scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`)\n")
    print("\n" + table + summary)
    Path(args.out).write_text(table + summary)
    return 1 if rep.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
