"""The factory SGLang's attention registry calls for "helix" (the BACKEND row of srt.hook_table
registers it, with the --attention-backend choice)."""

from __future__ import annotations

from typing import Any

from ..memory.pools import HelixMLATokenToKVPool
from .gqa import HelixGQABackend
from .mla import HelixMLABackend


def create_helix_backend(model_runner: Any, **kwargs: Any):
    """Factory SGLang's attention registry calls for "helix": MLA pools get the MLA backend.
    kwargs: HelixBackendBase's (srt.spec passes a draft-tree step)."""
    if isinstance(model_runner.token_to_kv_pool, HelixMLATokenToKVPool):
        return HelixMLABackend(model_runner, **kwargs)
    return HelixGQABackend(model_runner, **kwargs)
