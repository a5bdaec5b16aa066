"""The CPU-engine DP-attention fix (sglang_helix.srt.cpu.dp_attention_fix): torch_native gets the
padding rows' seq_len SGLang's CPU engine asks for under DP attention, checked on SGLang's own
padding step (ForwardBatch._pad_inputs_to_size); where it is installed: tests/srt/test_hook_table.py.
Helix on, the "helix" backends define the method themselves (a real server:
tests/e2e/test_serve_parallel.py)."""

import importlib.util
import types

import pytest

from sglang_helix.srt.cpu import dp_attention_fix

needs_sglang = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang")


def test_hook_gives_the_fill_value_and_keeps_a_backends_own():
    backend = types.SimpleNamespace()
    dp_attention_fix._after_torch_native_init(None, backend)
    assert backend.get_cpu_graph_seq_len_fill_value() == 1
    own = types.SimpleNamespace(get_cpu_graph_seq_len_fill_value=lambda: 7)
    dp_attention_fix._after_torch_native_init(None, own)
    assert own.get_cpu_graph_seq_len_fill_value() == 7


SGLANG_CHECKS = {"dp-attention: torch_native answers SGLang's CPU padding step": """
import types
import torch
import sglang.srt.model_executor.forward_batch_info as fbi
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
assert fbi._is_cpu  # the CPU engine: SGLang asks get_cpu_graph_seq_len_fill_value
assert not hasattr(TorchNativeAttnBackend, "get_cpu_graph_seq_len_fill_value")  # why the fix exists
runner = types.SimpleNamespace(device="cpu", req_to_token_pool=None, token_to_kv_pool=None)
runner.attn_backend = TorchNativeAttnBackend(runner)

class Batch:  # the fields SGLang's padding step reads; every optional one absent (None)
    def __getattr__(self, name):
        return None
    _pad_tensor_to_size = fbi.ForwardBatch._pad_tensor_to_size

batch = Batch()
batch.input_ids, batch.positions = torch.tensor([5, 6, 7]), torch.tensor([9, 4, 2])
batch.out_cache_loc, batch.req_pool_indices = torch.tensor([30, 31, 32]), torch.tensor([2, 1, 3])
batch.seq_lens, batch.seq_lens_cpu = torch.tensor([10, 5, 3]), torch.tensor([10, 5, 3])
batch.seq_lens_sum = 18
fbi.ForwardBatch._pad_inputs_to_size(batch, runner, 4, 4)  # DP attention: 3 rows padded to 4
assert batch.seq_lens.tolist() == [10, 5, 3, 1] and batch.seq_lens_cpu.tolist() == [10, 5, 3, 1]
assert batch.seq_lens_sum == 19 and batch.req_pool_indices.tolist() == [2, 1, 3, 0]
assert batch.input_ids.tolist() == [5, 6, 7, 0] and batch.out_cache_loc.tolist() == [30, 31, 32, 0]
"""}


@needs_sglang
def test_torch_native_pads_dp_attention_rows_on_the_cpu_engine(sglang_checks):
    """SGLang's real padding step on a real TorchNativeAttnBackend (Helix off): without the fix it
    dies on the missing method; with it, each padding row is request slot 0 attending 1 token."""
    sglang_checks.assert_ok("dp-attention: torch_native answers SGLang's CPU padding step")
