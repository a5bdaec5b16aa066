"""gpu_check's inputs: the model shapes it checks (DeepSeek-V3 MLA latent, Llama-70B GQA) and
shuffled paged KV caches with poisoned (NaN) unused slots for GQA and MLA decode."""

from __future__ import annotations

MLA_R, MLA_DR = 512, 64
GQA_K, GQA_D, GQA_H = 8, 128, 64


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
