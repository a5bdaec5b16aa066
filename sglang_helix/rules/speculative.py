"""Speculative decoding with Helix.

With `--enable-helix` every drafter below is verified by the helix backend as an extend over each
request's KV-sharded prefix (partial attention + one exchange; srt.backends), chains causal among
the drafts, draft trees under the tree mask; accepted tree nodes move their KV to their path's
positions on the owner ranks (srt.memory.pools, core `spec_plan`):

- `--speculative-algorithm NGRAM` (model-free, GQA and MLA models), chain drafts
  (`--speculative-ngram-max-bfs-breadth 1`; srt.spec turns NGRAM's padded masks into chains);
- `--speculative-algorithm NEXTN` on a DeepSeek-style MLA model: the checkpoint's own MTP layer
  (SGLang resolves NEXTN to EAGLE with the target checkpoint as the draft model; EAGLE typed with
  no other draft model is the same thing);
- `--speculative-algorithm EAGLE3 --speculative-draft-model-path <draft>` (an EAGLE-3 draft,
  `LlamaForCausalLMEagle3`) and `EAGLE --speculative-draft-model-path <draft>` (an EAGLE-1/2 draft,
  `LlamaForCausalLMEagle`) on a GQA (Llama-style) model.
The draft model's KV lives in a Helix pool of its own (1/KVP per rank, the target's page colours)
and its attention is the helix backend's, in the draft extend and in every draft step. Chains
(`--speculative-eagle-topk 1`, draft tokens = steps + 1) and draft trees (top-k > 1) both.

Refused, with the flag and the fix:

- other algorithms (STANDALONE, DFLASH, DSPARK, ...): their draft models' attention and KV under
  Helix are not built;
- NGRAM with a BFS breadth other than 1: SGLang itself refuses NGRAM trees at a page size > 1 on
  every backend but flashinfer (its paged tree verify is "unstable"), and Helix pages are >= 2
  tokens;
- a chain (top-k 1) with a draft token count other than steps + 1;
- NEXTN (no separate draft) on a GQA model: the MTP layers of Qwen3-Next / GLM-style models are
  not hooked; a separate EAGLE / EAGLE-3 draft model on an MLA model: a Llama-style draft's GQA
  KV cache next to the target's Helix latent pool is not built.

The settings not given (None) are resolved by SGLang later and checked again then.
"""

from __future__ import annotations

from .refusal import refuse
from .server import ServerLayout

HELIX_SPEC_ALGORITHMS = ("NGRAM", "NEXTN", "EAGLE", "EAGLE3")  # EAGLE: SGLang's name for NEXTN once resolved
MTP_FIX = "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4"
EAGLE3_FIX = ("--speculative-algorithm EAGLE3 --speculative-draft-model-path <draft> "
              "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4")


def check_speculative(server: ServerLayout, *, is_mla: bool | None = None) -> None:
    """Refuse what Helix cannot verify. is_mla: the model's attention (None: not known yet, the
    flags-only stage)."""
    algorithm = (server.speculative_algorithm or "").upper()
    if not algorithm:
        return
    if algorithm not in HELIX_SPEC_ALGORITHMS:
        refuse(f"--speculative-algorithm {server.speculative_algorithm}: with Helix only NGRAM "
               "(model-free drafts), NEXTN (DeepSeek's MTP layer), EAGLE and EAGLE3 (a draft "
               "model) are supported; use --speculative-algorithm NGRAM "
               f"--speculative-ngram-max-bfs-breadth 1, NEXTN with {MTP_FIX}, {EAGLE3_FIX}, or drop "
               "--speculative-algorithm")
    if algorithm == "NGRAM":
        _check_ngram(server)
        return
    _check_draft_model(server, algorithm, is_mla)
    _check_chain_tokens(server)


def _check_ngram(server: ServerLayout) -> None:
    breadth = server.speculative_ngram_max_bfs_breadth
    if breadth is not None and int(breadth) != 1:
        refuse(f"--speculative-ngram-max-bfs-breadth {breadth}: an NGRAM draft tree (SGLang's "
               "default breadth is 10); SGLang refuses NGRAM trees at a page size > 1 outside "
               "flashinfer and Helix pages hold >= 2 tokens; set --speculative-ngram-max-bfs-breadth 1")


def _separate_draft(server: ServerLayout) -> bool:
    return server.speculative_draft_model_path not in (None, server.model_path)


def _check_draft_model(server: ServerLayout, algorithm: str, is_mla: bool | None) -> None:
    """NEXTN / EAGLE without a draft: the MLA checkpoint's MTP layer; EAGLE / EAGLE3 with a draft
    model: a Llama-style draft of a GQA target."""
    name, draft = server.speculative_algorithm, server.speculative_draft_model_path
    if algorithm == "NEXTN" or (algorithm == "EAGLE" and not _separate_draft(server)):
        if is_mla is False:
            refuse(f"--speculative-algorithm {name} on a GQA model: Helix serves NEXTN with "
                   "DeepSeek-style MLA models (their MTP layer) only; use "
                   f"{EAGLE3_FIX}, or --speculative-algorithm NGRAM --speculative-ngram-max-bfs-breadth 1")
        return
    if is_mla is True:
        refuse(f"--speculative-algorithm {name} with --speculative-draft-model-path {draft} on an "
               "MLA model: Helix serves separate EAGLE / EAGLE-3 draft models on GQA (Llama-style) "
               f"models only; use --speculative-algorithm NEXTN with {MTP_FIX} (the checkpoint's "
               "MTP layer)")


def _check_chain_tokens(server: ServerLayout) -> None:
    topk, steps, tokens = (server.speculative_eagle_topk, server.speculative_num_steps,
                           server.speculative_num_draft_tokens)
    if topk is None or int(topk) != 1 or steps is None or tokens is None:
        return
    if int(tokens) != int(steps) + 1:
        refuse(f"--speculative-num-draft-tokens {tokens} with --speculative-num-steps {steps} and "
               f"--speculative-eagle-topk 1: a chain of {steps} drafts verifies {int(steps) + 1} "
               f"tokens; set --speculative-num-draft-tokens {int(steps) + 1} (or a top-k > 1 for a "
               "draft tree)")
