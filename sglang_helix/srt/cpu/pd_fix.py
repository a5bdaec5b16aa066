"""CPU-engine fixes for SGLang 0.5.23's PD path (any server, Helix or not, SGLANG_USE_CPU_ENGINE=1).

- the prefill's pinned-memory + CUDA-event page-index copy is switched to the host path;
- a decode server's retraction backup defaults to `cpu_tensor` instead of the pinned host pool
  (`_cuda_host_register` needs a CUDA driver);
- the prefill's early send of a radix-cached prefix (overlap scheduler) records a
  `torch.cuda.Event` on the forward stream and kills the prefill scheduler on CPU ("expected
  stream to be a torch.Stream"); it is skipped there (an optional optimization: the request's
  regular sends cover the whole range, as SGLang itself does for unaligned DCP hits).
Inert where CUDA is available; installed on the CPU engine only (fix "pd-host-path" of
srt.cpu.fixes, rows of srt.hook_table).
"""

from __future__ import annotations

from typing import Any, Callable

import torch




def _around_sender_init(original: Callable, sender: Any, *args: Any, **kwargs: Any) -> None:
    original(sender, *args, **kwargs)
    if not torch.cuda.is_available():
        # The host-tensor path copies page indices into pinned memory behind a CUDA event.
        sender.supports_host_tensor_indices = False


def _around_retraction(original: Callable, *args: Any, **kwargs: Any) -> str:
    from sglang.srt.runtime_context import get_context, get_disagg

    if get_disagg().disaggregation_decode_retraction_backup is None and not torch.cuda.is_available():
        # host_pool mirrors device KV into pinned host memory: on the CPU engine the "device"
        # already is host memory, and pinning needs a CUDA driver.
        get_context().override("sglang_helix.cpu_pd", disaggregation_decode_retraction_backup="cpu_tensor")
    return original(*args, **kwargs)


def _around_early_send(original: Callable, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    if getattr(scheduler, "enable_overlap", False) and not torch.cuda.is_available():
        return None  # would record a torch.cuda.Event; the regular sends carry the prefix
    return original(scheduler, *args, **kwargs)
