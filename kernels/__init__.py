"""Helix decode-attention kernels (installed as sglang_helix.kernels).

reference: fp32 torch references (ground truth for every kernel test).
"""

from .reference import full_attention_ref, gqa_partial_ref, merge_ref, mla_partial_ref

__all__ = ["full_attention_ref", "gqa_partial_ref", "merge_ref", "mla_partial_ref"]
