"""Every Helix launch rule that needs no SGLang, in one place (the core: SGLang never imported).

The plugin's resolution hooks (srt.resolution) and the planner (sglang_helix.plan) both call
`check_launch` (whole_launch.py), so a launch line the planner prints is one the plugin accepts.
Each refusal is `refuse(...)`: HelixConfigError("Helix: <flag + fix>").

Modules: refusal (the one refusal), flags (the Helix flags as data and as parsed), server (the
SGLang settings read, and their flags), model (architectures, MLA weight dtypes), sizes (KVP,
TPA, heads, EP -> HelixConfig), features (parallelisms, caches, devices, attention backends),
pd (PD disaggregation), speculative (NGRAM / NEXTN chains), kv_cache (page size, KV dtype),
graphs (CUDA-graph phases), whole_launch (all of them), argv (reading a command line).
"""

from .whole_launch import check_launch, check_server_flags

__all__ = ["check_launch", "check_server_flags"]
