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
# EAGLE-3 chain drafts (SGLang's usual EAGLE-3 setting) from the tiny Llama's own tiny EAGLE-3
# draft (sglang_helix.dev.eagle3_training.ensure_eagle3_draft: the real on-disk format, trained on
# the target's greedy text); GQA models only.
EAGLE3_DRAFT_TOKENS = 4
EAGLE3_ARGS = ("--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "3",
               "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(EAGLE3_DRAFT_TOKENS))


@dataclass(frozen=True)
class ServerConfig:
    """One server layout: kvp 1 = plain TP (Helix off)."""

    name: str
    kvp: int = 1
    comm: str = "a2a"
    hopb_slices: int = 1
    ngram: bool = False
    eagle3: bool = False

    @property
    def helix(self) -> bool:
        return self.kvp > 1

    @property
    def speculative(self) -> bool:
        return self.ngram or self.eagle3

    def server_args(self, draft: str | None = None) -> list[str]:
        """This layout's flags; `draft`: the EAGLE-3 draft model's directory (eagle3 configs)."""
        spec = list(NGRAM_ARGS) if self.ngram else []
        if self.eagle3:
            if draft is None:
                raise ServingCompareError(f"{self.name}: an EAGLE-3 configuration needs its draft "
                                          "model's directory")
            spec = [*EAGLE3_ARGS, "--speculative-draft-model-path", str(draft)]
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
        ServerConfig("helix-a2a-eagle3", KVP, "a2a", 1, eagle3=True),
    )
}
# The run in docs/results.md (no NGRAM: its drafts need a repetitive prompt set to be accepted;
# no EAGLE-3: GQA only).
DEFAULT_CONFIGS = ("tp2", "helix-a2a", "helix-ag_rs", "helix-a2a-hopb2")
MODELS = ("mla", "gqa")
MODEL_NAMES = {
    "mla": "tiny DeepSeek-V3-style MLA+MoE (sglang_helix.dev.tiny_models 'mla', random weights)",
    "gqa": "tiny Llama GQA, 8 heads / 2 KV heads (sglang_helix.dev.tiny_models 'gqa', random weights)",
}
PROMPT_SETS = ("random", "repetitive")
