"""Speculative decoding with Helix.

With `--enable-helix` two drafters are served, both verified by the helix backend as an extend
chunk over each request's KV-sharded prefix, causal among the drafts (srt.backends.base):

- `--speculative-algorithm NGRAM` (model-free, GQA and MLA models) with chain drafts
  (`--speculative-ngram-max-bfs-breadth 1`; srt.spec turns NGRAM's padded masks into chains);
- `--speculative-algorithm NEXTN` on a DeepSeek-style MLA model: the checkpoint's own MTP layer
  drafts a chain of k tokens (`--speculative-num-steps k --speculative-eagle-topk 1
  --speculative-num-draft-tokens k+1`, e.g. SGLang's DeepSeek setting k = 3). The draft layer's
  latent KV lives in a Helix pool of its own (1/KVP per rank, the target's page colours) and its
  attention is the helix backend's (partial attention + exchange), like the target's. SGLang
  resolves NEXTN to EAGLE with the target checkpoint as the draft model; EAGLE typed with no
  other draft model is the same thing.

Everything else is refused with the flag and the fix:

- other algorithms (EAGLE3, STANDALONE, DFLASH, ...) and EAGLE with a separate draft model:
  their draft model's attention and KV under Helix are not built;
- NGRAM with a BFS breadth other than 1 (SGLang's default is 10) and NEXTN with top-k > 1 (draft
  trees: an accepted tree node would move its KV between positions owned by different KVP
  ranks), and NEXTN with a draft token count other than steps + 1 (a chain of k drafts verifies
  k + 1 tokens);
- NEXTN on a GQA model (the MTP layers of Qwen3-Next / GLM-style models are not hooked).

The NEXTN settings not given (None) are resolved by SGLang later and checked again then.
"""

from __future__ import annotations

from .refusal import refuse
from .server import ServerLayout

HELIX_SPEC_ALGORITHMS = ("NGRAM", "NEXTN", "EAGLE")  # EAGLE: SGLang's name for NEXTN once resolved
MTP_FIX = "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4"


def check_speculative(server: ServerLayout, *, is_mla: bool | None = None) -> None:
    """Refuse what Helix cannot verify. is_mla: the model's attention (None: not known yet, the
    flags-only stage)."""
    algorithm = (server.speculative_algorithm or "").upper()
    if not algorithm:
        return
    if algorithm not in HELIX_SPEC_ALGORITHMS:
        refuse(f"--speculative-algorithm {server.speculative_algorithm}: with Helix only NGRAM "
               "(model-free drafts) and NEXTN (DeepSeek's MTP layer) are supported; use "
               "--speculative-algorithm NGRAM --speculative-ngram-max-bfs-breadth 1, NEXTN with "
               f"{MTP_FIX}, or drop --speculative-algorithm")
    if algorithm == "NGRAM":
        _check_ngram(server)
    else:
        _check_mtp(server, is_mla)


def _check_ngram(server: ServerLayout) -> None:
    breadth = server.speculative_ngram_max_bfs_breadth
    if breadth is not None and int(breadth) != 1:
        refuse(f"--speculative-ngram-max-bfs-breadth {breadth}: Helix verifies chain drafts only "
               "(SGLang's default breadth is 10, a draft tree); set "
               "--speculative-ngram-max-bfs-breadth 1")


def _check_mtp(server: ServerLayout, is_mla: bool | None) -> None:
    name, draft = server.speculative_algorithm, server.speculative_draft_model_path
    if draft not in (None, server.model_path):
        refuse(f"--speculative-algorithm {name} with --speculative-draft-model-path {draft}: with "
               "Helix the draft is the checkpoint's own MTP layer (NEXTN); a separate EAGLE draft "
               "model is not supported; drop --speculative-draft-model-path")
    if is_mla is False:
        refuse(f"--speculative-algorithm {name} on a GQA model: Helix serves NEXTN with "
               "DeepSeek-style MLA models (their MTP layer) only; use --speculative-algorithm NGRAM "
               "--speculative-ngram-max-bfs-breadth 1")
    topk = server.speculative_eagle_topk
    if topk is not None and int(topk) != 1:
        refuse(f"--speculative-eagle-topk {topk}: Helix serves {name} with chain drafts (a draft "
               "tree's accepted nodes would move KV between KVP ranks); set "
               f"--speculative-eagle-topk 1, e.g. {MTP_FIX}")
    steps, tokens = server.speculative_num_steps, server.speculative_num_draft_tokens
    if steps is not None and tokens is not None and int(tokens) != int(steps) + 1:
        refuse(f"--speculative-num-draft-tokens {tokens} with --speculative-num-steps {steps}: a "
               f"chain of {steps} drafts verifies {int(steps) + 1} tokens; set "
               f"--speculative-num-draft-tokens {int(steps) + 1}")
