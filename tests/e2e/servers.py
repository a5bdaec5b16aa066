"""Every real-server configuration of the e2e suite, once: one row per distinct launch.

A test asks for a configuration by name (`@pytest.mark.server("mla-kvp2")`); the e2e conftest
starts it once for every test that names it (tests are grouped by configuration), starts the
next row while one serves its tests (at most two alive), and prints each row's start, wait and
use times at the end of the run.
Rows differ in what they launch; tests that differ only in what they send share a row. PD
deployments and the offline Engine have their own fixtures (several processes per launch), in
tests/e2e/test_serve_pd.py and tests/e2e/test_serve_gqa.py; they run after every row's tests.
"""

from __future__ import annotations

from dataclasses import dataclass

P = 4  # page size of every e2e server: prompts of 3..44 tokens span up to 11 pages
CHUNK = ("--chunked-prefill-size", "16")  # the 44-token prompt is prefilled in 3 chunks
FP8_KV = ("--kv-cache-dtype", "fp8_e4m3")
BF16 = ("--dtype", "bfloat16")  # SGLang's fp8 linear method runs bf16 / fp16 activations only
HELIX = ("--enable-helix",)
KVP2_TPA1 = (*HELIX, "--helix-kvp-size", "2", "--helix-tpa-size", "1")
# SGLang counts the n-gram corpus / draft state against the host's free memory at start: the
# harness default 0.05 is refused whenever other processes hold memory; the pool stays capped by
# --max-total-tokens either way.
SPEC_MEM = ("--mem-fraction-static", "0.3")
NGRAM = ("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4",
         "--speculative-ngram-max-bfs-breadth", "1", "--speculative-ngram-capacity", "100000",
         "--decode-log-interval", "1", *SPEC_MEM)
MTP_STEPS = 3  # SGLang's DeepSeek setting: a chain of 3 drafts, verified as 4 tokens
NEXTN = ("--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(MTP_STEPS),
         "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(MTP_STEPS + 1),
         *SPEC_MEM)
# Draft trees: top-k 2 over 3 steps, 4 nodes verified per step (SGLang's page-tree layout: each
# branch's drafts in their own pages)
TREE = ("--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
        "--speculative-num-draft-tokens", "4", "--decode-log-interval", "1", *SPEC_MEM)
EVICT_POOL = 256  # logical tokens of the GQA server: radix eviction under 8 x 50-token requests
HICACHE = ("--enable-hierarchical-cache", "--hicache-ratio", "2")
# the file storage tier: a storage hit is read before the request runs (wait_complete), for any
# span of a page or more; the files go to a directory of this test session ({run_dir})
HICACHE_FILE = ("--hicache-storage-backend", "file", "--hicache-storage-prefetch-policy", "wait_complete",
                "--hicache-storage-backend-extra-config", '{"prefetch_threshold": 4}')
HICACHE_DIR = ("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", "{run_dir}/hicache-files")
MIXED = ("--enable-mixed-chunk",)  # decode rows ride in a prefill chunk's batch
# 4 ranks on the 2 cores (SGLang binds one core per rank; a core may serve two ranks)
BIND4 = (("SGLANG_CPU_OMP_THREADS_BIND", "0|1|0|1"),)
# SGLang's DeepSeek layout as users spell it (SGLang resolves it to --attn-dp-size 2, --dp-size 1)
DPA2 = ("--enable-dp-attention", "--dp-size", "2")


# Every e2e server: SGLang's warm-up request (a short generate before /health turns 200) proves
# nothing the tests' own first request does not, and took ~4 s per start on 2 cores (its
# /generate and "ready to roll" lines in a server log).
E2E_COMMON = ("--skip-server-warmup",)


@dataclass(frozen=True)
class ServerSpec:
    """One launch: the tiny model kind (sglang_helix.dev.tiny_models), --tp-size, flags, env."""

    model: str
    tp: int
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    why: str = ""
    draft: str = ""  # "eagle3": --speculative-draft-model-path of the target's tiny EAGLE-3 draft

    @property
    def helix(self) -> bool:
        return "--enable-helix" in self.args


SERVERS: dict[str, ServerSpec] = {
    # ---------------------------------------------------------------- GQA
    "qwen2-kvp2": ServerSpec(
        "qwen2", 2, ("--page-size", str(P), *CHUNK, *FP8_KV, "--max-total-tokens", str(EVICT_POOL),
                     *KVP2_TPA1, *HICACHE, *HICACHE_FILE),
        env=(HICACHE_DIR,),
        why="GQA KVP 2 x TPA 1 (Qwen2 qkv bias, QKV replicated over KVP), fp8 KV pages, chunked "
            "prefill, radix prefix hits and eviction in a small pool, HiCache write-through to "
            "host and file tiers per KVP rank, aborts, /server_info"),
    "gqa-pp2-kvp2": ServerSpec(
        "gqa", 2, ("--page-size", str(P), *CHUNK, "--pp-size", "2", *KVP2_TPA1), env=BIND4,
        why="pipeline parallel 2 x TP 2 (4 ranks): each stage's TP group is one Helix group, its "
            "pool holding its layers' pages 1/KVP per rank"),
    "gqa-dp2-kvp2": ServerSpec(
        "gqa", 2, ("--page-size", str(P), *CHUNK, "--dp-size", "2", *KVP2_TPA1), env=BIND4,
        why="DP replicas 2 x TP 2 (4 ranks), each its own Helix group; sglang-router's "
            "cache-aware policy in front (dp-aware)"),
    "qwen3-kvp2-tpa2": ServerSpec(
        "qwen3", 4, ("--page-size", str(P), *HELIX, "--helix-kvp-size", "2", "--helix-tpa-size", "2"),
        why="GQA KVP 2 x TPA 2 on 4 ranks (Qwen3 per-head q/k norm, one KV head per rank)"),
    "gqa-kvp2-ngram": ServerSpec(
        "gqa", 2, ("--page-size", str(P), *KVP2_TPA1, *NGRAM),
        why="Helix + NGRAM chain drafts (Llama), verify over the KV-sharded prefix"),
    "gqa-off-ngram": ServerSpec(
        "gqa", 1, ("--page-size", str(P), *NGRAM),
        why="Helix off: the CPU engine's NGRAM ops (srt.cpu.spec_fix); the harness against "
            "transformers; OpenAI endpoints"),
    "eagle3-kvp2-tree": ServerSpec(
        "gqa", 2, ("--page-size", str(P), *KVP2_TPA1, "--speculative-algorithm", "EAGLE3", *TREE),
        draft="eagle3",
        why="Helix + EAGLE-3 draft trees (Llama): the draft's KV-sharded pool, tree verify and "
            "cross-rank KV moves"),
    # ---------------------------------------------------------------- MLA (DeepSeek-V3-style)
    "mla-kvp2": ServerSpec(
        "mla", 2, ("--page-size", str(P), *CHUNK, *HELIX, "--helix-hopb-slices", "2",
                   "--ep-size", "2", *MIXED),
        why="MLA KVP 2, latent exchange, HOP-B 2 slices, FFN as MoE TP 1 x EP 2 on the same ranks, "
            "mixed chunks (decode rows in a prefill chunk's batch)"),
    "mla-dpa2-kvp2": ServerSpec(
        "mla", 4, ("--page-size", str(P), *CHUNK, *DPA2, *HELIX), env=BIND4,
        why="DP attention 2 x attention TP 2 (4 ranks): each DP-attention group one Helix group "
            "(KVP 2), the MoE FFN TP 4 over all ranks"),
    "mla-kvp2-value": ServerSpec(
        "mla", 2, ("--page-size", str(P), *CHUNK, *FP8_KV, *HELIX, "--helix-mla-exchange", "value",
                   "--helix-hopb-slices", "2", "--helix-exchange-dtype", "activation"),
        why="MLA value exchange (W_UV replicated), exchange in the activation dtype, fp8 latent "
            "pages"),
    "mla-off": ServerSpec(
        "mla", 2, ("--page-size", str(P), *CHUNK, *FP8_KV, "--ep-size", "2"),
        why="Helix off: the CPU fixes that make SGLang serve this at all (absorbed MLA, native MoE "
            "with EP, fp8 KV on torch_native)"),
    "mla-kvp2-ngram": ServerSpec(
        "mla", 2, ("--page-size", str(P), *CHUNK, *HELIX, *NGRAM),
        why="Helix + NGRAM on MLA: latent moves stay on their page owner"),
    "mtp-off": ServerSpec(
        "mla-mtp", 2, ("--page-size", str(P), *CHUNK, *NEXTN),
        why="Helix off DeepSeek MTP (CPU EAGLE ops): the drafts Helix must reproduce"),
    "mtp-kvp2": ServerSpec(
        "mla-mtp", 2, ("--page-size", str(P), *CHUNK, *NEXTN, *HELIX, "--helix-kvp-size", "2"),
        why="Helix + MTP: the MTP layer's own KV-sharded pool, exchange in every draft step"),
    "mtp-kvp2-tree": ServerSpec(
        "mla-mtp", 2, ("--page-size", str(P), *CHUNK, "--speculative-algorithm", "NEXTN", *TREE,
                       *HELIX, "--helix-kvp-size", "2"),
        why="Helix + DeepSeek MTP draft trees: tree verify over the latent-sharded prefix"),
    # ---------------------------------------------------------------- fp8 checkpoints (bf16)
    "mla-fp8-kvp2": ServerSpec(
        "mla-fp8", 2, ("--page-size", str(P), *CHUNK, *BF16, *HELIX),
        why="block-fp8 DeepSeek-style checkpoint: fp8 replicated q projection, W_UK from fp8"),
    "qwen3-fp8-tpa2": ServerSpec(
        "qwen3-fp8", 2, ("--page-size", str(P), *CHUNK, *BF16, *HELIX, "--helix-kvp-size", "1"),
        why="block-fp8 GQA at KVP 1 x TPA 2: QKV rebuilt TPA ways from the fp8 shards + block scales"),
    "gqa-fp8-tensor-kvp2": ServerSpec(
        "gqa-fp8-tensor", 2, ("--page-size", str(P), *CHUNK, *BF16, *KVP2_TPA1),
        why="per-tensor fp8 (AutoFP8) Llama at KVP 2 x TPA 1: the CPU fp8 path keeps each QKV / "
            "gate_up shard's own scale; QKV replicated whole over KVP"),
    "qwen3-fp8-ct-tpa2": ServerSpec(
        "qwen3-fp8-ct", 2, ("--page-size", str(P), *CHUNK, *BF16, *HELIX, "--helix-kvp-size", "1"),
        why="compressed-tensors FP8-dynamic Qwen3 at KVP 1 x TPA 2: per-channel scales sliced with "
            "the TPA-sharded QKV Helix builds; SGLang's weight-only fp8 scheme on CPU"),
    # ---------------------------------------------------------------- NVFP4 checkpoint (bf16)
    "mla-nvfp4-kvp2": ServerSpec(
        "mla-nvfp4", 2, ("--page-size", str(P), *CHUNK, *BF16, *HELIX, "--ep-size", "2"),
        why="NVFP4 (ModelOpt) DeepSeek-style checkpoint: bf16 MLA projections replicated, NVFP4 "
            "o_proj / MLPs / experts (EP 2) on the CPU weight-only path"),
}

