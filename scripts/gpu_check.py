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
  (c) graph  HelixAttention (KVP=1, LocalExchange, kernels="triton"): plan, capture forward_mla /
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

This file is the command line and the run; its parts: gpu_check_kernels.py ((a), (d), (e)),
gpu_check_bandwidth.py (timer, copy, (b)), gpu_check_graph.py ((c)), gpu_check_problems.py
(shapes and paged inputs), gpu_check_report.py (rows, table, comparison with the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests): find siblings
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_bandwidth import Timer, bandwidth_section, copy_bandwidth  # noqa: E402
from gpu_check_graph import graph_section  # noqa: E402
from gpu_check_kernels import correctness, extend_section, fp8_section  # noqa: E402
from gpu_check_report import Report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
