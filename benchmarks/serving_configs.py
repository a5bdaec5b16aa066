"""serving_compare's table of server layouts, models and prompt sets (the flags each server gets)."""

from __future__ import annotations

from dataclasses import dataclass

TP = 2
KVP = 2
# The --dtype choices of serving_compare (its KV dtype too: SGLang's default kv_cache_dtype).
DTYPES = ("bfloat16", "float16", "float32")


class ServingCompareError(RuntimeError):
    """A benchmark run, a server or a budget check failed (the message says which and why)."""


# NGRAM chain drafts as tests/e2e/test_serve_spec.py runs them: Helix verifies chains only
# (breadth 1); SGLang's default corpus capacity (10M) did not fit --mem-fraction-static 0.05.
NGRAM_DRAFT_TOKENS = 4
NGRAM_ARGS = ("--speculative-algorithm", "NGRAM",
              "--speculative-num-draft-tokens", str(NGRAM_DRAFT_TOKENS),
              "--speculative-ngram-max-bfs-breadth", "1", "--speculative-ngram-capacity", "100000")


@dataclass(frozen=True)
class ServerConfig:
    """One server layout: kvp 1 = plain TP (Helix off)."""

    name: str
    kvp: int = 1
    comm: str = "a2a"
    hopb_slices: int = 1
    ngram: bool = False

    @property
    def helix(self) -> bool:
        return self.kvp > 1

    def server_args(self) -> list[str]:
        spec = list(NGRAM_ARGS) if self.ngram else []
        if not self.helix:
            return spec
        return ["--enable-helix", "--helix-kvp-size", str(self.kvp), "--helix-tpa-size", "1",
                "--helix-comm-backend", self.comm, "--helix-hopb-slices", str(self.hopb_slices),
                *spec]


CONFIGS: dict[str, ServerConfig] = {
    c.name: c for c in (
        ServerConfig("tp2"),
        ServerConfig("helix-a2a", KVP, "a2a", 1),
        ServerConfig("helix-ag_rs", KVP, "ag_rs", 1),
        ServerConfig("helix-a2a-hopb2", KVP, "a2a", 2),
        ServerConfig("helix-a2a-ngram", KVP, "a2a", 1, ngram=True),
    )
}
# The run in docs/results.md (no NGRAM: its drafts need a repetitive prompt set to be accepted).
DEFAULT_CONFIGS = ("tp2", "helix-a2a", "helix-ag_rs", "helix-a2a-hopb2")
MODELS = ("mla", "gqa")
MODEL_NAMES = {
    "mla": "tiny DeepSeek-V3-style MLA+MoE (sglang_helix.dev.tiny_models 'mla', random weights)",
    "gqa": "tiny Llama GQA, 8 heads / 2 KV heads (sglang_helix.dev.tiny_models 'gqa', random weights)",
}
PROMPT_SETS = ("random", "repetitive")
