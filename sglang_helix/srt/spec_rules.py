"""Launch rules for speculative decoding with Helix (pure: no SGLang import; srt.args runs them).

With `--enable-helix` only `--speculative-algorithm NGRAM` is served (GQA and MLA models), with chain
drafts (`--speculative-ngram-max-bfs-breadth 1`): the helix backend verifies each request's
drafts as an extend chunk over its KV-sharded prefix, causal among the drafts (srt.spec,
srt.backends.base). Everything else is refused here with the flag and the fix:

- any other algorithm (EAGLE, EAGLE3, NEXTN / MTP, STANDALONE, DFLASH, ...): their draft worker
  owns a second KV pool, which the Helix pool hooks refuse;
- NGRAM with a BFS breadth other than 1 (draft trees: an accepted tree node would move its KV
  between positions owned by different KVP ranks).
"""

from __future__ import annotations

from ..config import HelixConfigError

HELIX_SPEC_ALGORITHMS = ("NGRAM",)


def check_speculative(algorithm: str | None, *, breadth: int | None = None) -> None:
    """Refuse what Helix cannot verify. algorithm: --speculative-algorithm (None: off); breadth:
    --speculative-ngram-max-bfs-breadth as resolved (None: not known yet, e.g. a planner line).
    GQA and MLA models alike: their drafts are verified by the one extend algorithm."""
    if not algorithm:
        return
    if algorithm.upper() not in HELIX_SPEC_ALGORITHMS:
        _refuse(f"--speculative-algorithm {algorithm}: with Helix only NGRAM (model-free drafts) "
                "is supported; use --speculative-algorithm NGRAM "
                "--speculative-ngram-max-bfs-breadth 1, or drop --speculative-algorithm")
    if breadth is not None and int(breadth) != 1:
        _refuse(f"--speculative-ngram-max-bfs-breadth {breadth}: Helix verifies chain drafts only "
                "(SGLang's default breadth is 10, a draft tree); set "
                "--speculative-ngram-max-bfs-breadth 1")


def _refuse(message: str) -> None:
    raise HelixConfigError(f"Helix: {message}")
