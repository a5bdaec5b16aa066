"""CPU-engine fix: DP attention on torch_native (Helix off; Helix's own backend has the method).

Under DP attention (--attn-dp-size D, or --enable-dp-attention --dp-size D) SGLang 0.5.23 pads
every batch's rows to a multiple of the attention TP size before the FFN's cross-group gather
(`ForwardBatch._pad_inputs_to_size`, from `prepare_mlp_sync_batch`), and on the CPU engine asks
the attention backend for the seq_len of the padding rows with
`get_cpu_graph_seq_len_fill_value()`. Only SGLang's intel_amx and hybrid linear backends define
it; torch_native does not, so the first batch dies with "'TorchNativeAttnBackend' object has no
attribute 'get_cpu_graph_seq_len_fill_value'".

The fix gives each torch_native backend that method with intel_amx's value, 1: a padding row
(request slot 0, whose first KV slot always exists) attends one token and its output is dropped
after the FFN, so real rows are untouched (exact). The hook is an AFTER on
`TorchNativeAttnBackend.__init__` (HookRegistry cannot add a missing class attribute), installed on
the CPU engine only (srt.cpu.fixes "dp-attention"); off the CPU engine SGLang asks for the CUDA
fill value instead and the method is never read.
"""

from __future__ import annotations

from typing import Any

PADDING_SEQ_LEN = 1  # intel_amx_backend.IntelAMXAttnBackend.get_cpu_graph_seq_len_fill_value


def padding_seq_len() -> int:
    """The seq_len of a padding row (SGLang's CPU-engine fill value)."""
    return PADDING_SEQ_LEN


def _after_torch_native_init(result: Any, backend: Any, *args: Any, **kwargs: Any) -> None:
    """Give a new TorchNativeAttnBackend the fill value the CPU engine asks for under DP attention
    (kept if SGLang ever defines its own)."""
    if not hasattr(backend, "get_cpu_graph_seq_len_fill_value"):
        backend.get_cpu_graph_seq_len_fill_value = padding_seq_len
    return None
