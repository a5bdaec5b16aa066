"""gpu_check's (c): HelixAttention (KVP 1, impl "triton") captured in a CUDA graph, re-planned to
other lengths in the same buffers, replayed, and compared with eager and the fp32 reference (on
CPU: the eager re-plan only)."""

from __future__ import annotations

from gpu_check_problems import GQA_D, GQA_H, GQA_K, MLA_DR, MLA_R
from gpu_check_report import Report, compare


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
