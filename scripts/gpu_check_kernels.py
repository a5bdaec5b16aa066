"""gpu_check's kernel checks vs the fp32 references: (a) Triton GQA / MLA decode partials (split
auto and 1 split), the Triton merge, library kernels and impl="auto" where they import; (d) Triton
extend (causal chunk, paged prefix partial); (e) fp8 KV pages with bf16 queries."""

from __future__ import annotations

from gpu_check_problems import MLA_R, MLA_DR, gqa_problem, mla_problem
from gpu_check_report import Report, compare




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
