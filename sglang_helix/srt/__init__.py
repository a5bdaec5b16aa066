"""Everything that imports SGLang (0.5.23): the plugin and the serving glue.

plugin (entry point), hook_table (every seam into SGLang, one row each), sglang_version (the
supported range), resolution (SGLang's argument resolution running the core launch rules,
sglang_helix.rules), state (the per-process runtime), hooks (install one seam, liveness),
memory/ (allocator, pools), backends/ (the "helix" attention backend),
models/ (TPA-sharded GQA, DeepSeek MLA replication), pd (disaggregation relayout), info
(/server_info), cpu/ (CPU-engine env, sgl-kernel stand-in, CPU fixes). Imports flow from here
into the core (sglang_helix.*), never back.
"""
