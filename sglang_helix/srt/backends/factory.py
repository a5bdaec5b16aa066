"""Registration of the "helix" attention backend with SGLang, and the factory it calls."""

from __future__ import annotations

from typing import Any

from ..memory.pools import HelixMLATokenToKVPool
from .base import BACKEND_NAME
from .gqa import HelixGQABackend
from .mla import HelixMLABackend


def create_helix_backend(model_runner: Any):
    """Factory SGLang's attention registry calls for "helix": MLA pools get the MLA backend."""
    if isinstance(model_runner.token_to_kv_pool, HelixMLATokenToKVPool):
        return HelixMLABackend(model_runner)
    return HelixGQABackend(model_runner)


def register_helix_backend() -> None:
    """Register "helix" in SGLang's attention registry and the --attention-backend choices.

    Idempotent; called from plugin.register().
    """
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    register_attention_backend(BACKEND_NAME)(create_helix_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def backend_live() -> bool:
    """True if SGLang's registry maps "helix" to our factory."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS.get(BACKEND_NAME) is create_helix_backend
