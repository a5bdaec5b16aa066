"""gpu_check's timing: the timer (CUDA events with an L2 flush, or perf_counter on CPU), the
device-to-device copy bandwidth, and (b) the achieved bandwidth of the decode kernels = KV bytes
read (sglang_helix.kv_size) / kernel time, as a fraction of the copy bandwidth."""

from __future__ import annotations

import math
import statistics
import time

from gpu_check_problems import GQA_D, GQA_H, GQA_K, MLA_DR, MLA_R
from gpu_check_report import Report

BW_AIM = 0.70


def kv_bytes_per_token(kind: str, itemsize: int, kv_heads: int = GQA_K, head_dim: int = GQA_D) -> int:
    """Bytes of KV one token costs in one layer (sglang_helix.kv_size): GQA K and V of every KV
    head; MLA the latent + rope row."""
    from sglang_helix.kv_size import KVShape  # noqa: PLC0415 - after main() set TRITON_INTERPRET

    shape = KVShape.mla_latent(MLA_R, MLA_DR) if kind == "mla" else KVShape.gqa(kv_heads, head_dim)
    return shape.bytes_per_token(itemsize)


def bandwidth(bytes_moved: int, ms: float) -> float:
    """Bytes per second."""
    return bytes_moved / (ms * 1e-3)


def fmt_bw(bps: float) -> str:
    return f"{bps / 1e12:.3f} TB/s" if bps >= 1e11 else f"{bps / 1e9:.3f} GB/s"


def ctx_label(n: int) -> str:
    return f"{n // (1 << 20)}M" if n % (1 << 20) == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


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
