"""The KV cache a Helix launch asks for: page size (Helix's default when none is given) and
KV dtype."""

from __future__ import annotations

from .refusal import refuse

# --page-size not given: SGLang resolves it to 1, which the Helix allocator cannot color, so the
# plugin declares this instead. 64 is a size every backend with a Helix path
# (features.HELIX_ATTENTION_BACKENDS) accepts: FlashMLA needs exactly 64 and TRT-LLM MLA 32 or 64
# (SGLang 0.5.23 forces them there); flashinfer, fa3, triton and the CPU torch path take any page
# size, and SGLang's default chunked-prefill sizes are multiples of 64.
HELIX_DEFAULT_PAGE_SIZE = 64
DEFAULT_PAGE_SIZE_REASON = (
    "FlashMLA needs 64, TRT-LLM MLA 32 or 64, the other Helix backends take any size >= 2; "
    "SGLang's own default 1 cannot be colored by KVP owner"
)
# --kv-cache-dtype values whose pools carry block scales: Helix pools hold plain or per-tensor fp8.
BLOCK_SCALED_KV_DTYPES = frozenset({"mxfp8", "nvfp4", "fp4_mx_block16"})


def helix_page_size(page_size: int | None) -> int | None:
    """The page size Helix declares for a launch: HELIX_DEFAULT_PAGE_SIZE when --page-size was not
    given (`page_size` None, as SGLang keeps it until its own default resolves it to 1), else None:
    the given value stands, and check_page_size refuses it if it is < 2."""
    return HELIX_DEFAULT_PAGE_SIZE if page_size is None else None


def check_page_size(page_size: int | None) -> None:
    """Refuse a resolved page size < 2 (None counts as SGLang's default 1)."""
    if int(page_size or 1) < 2:
        refuse(f"--page-size {page_size}: the Helix allocator colors whole pages by KVP owner and "
               "SGLang's page-size-1 path allocates without positions; use --page-size 16 "
               "(or any >= 2)")


def check_kv_cache_dtype(kv_cache_dtype: str | None) -> None:
    """Refuse a block-scaled --kv-cache-dtype: Helix pools hold plain or fp8 (per-tensor scale)
    pages; auto, bf16/bfloat16, fp8_e4m3 and fp8_e5m2 pass (None: not given, auto)."""
    if kv_cache_dtype in BLOCK_SCALED_KV_DTYPES:
        refuse(f"--kv-cache-dtype {kv_cache_dtype}: Helix pools store plain or fp8 (per-tensor "
               "scale) KV pages, not block-scaled ones; use --kv-cache-dtype auto, bf16, fp8_e4m3 "
               "or fp8_e5m2")
