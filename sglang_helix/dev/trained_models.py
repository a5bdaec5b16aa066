"""The trained tiny kind ``"mla-trained"``: the ``"mla"`` architecture trained for a few seconds.

The random-weight kinds answer with noise; this one is the ``"mla"`` DeepSeek-V3-style MLA + MoE
model (same config keys, same safetensors layout, same loading path) whose weights were trained
here, on CPU with torch only, on `TRAINING_TEXT` (a few paragraphs about Helix and SGLang), with
a byte-level BPE tokenizer trained on that text. Its greedy continuation of a line of the text is
the rest of the text, so the demo prints words, and greedy top-1 / top-2 margins are wide (whole
logits, not the hundredths a random model gives), which makes token-exact comparisons between
implementations robust.

Deterministic: the seeded random init of ``"mla"``, seeded batches, one torch thread while
training (restored after). Cached like every tiny kind (`tiny_models.ensure_tiny_model`); the text
and every training setting enter its cache key (`cache_fields`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Trained kind -> the random-weight kind whose architecture and init it starts from.
BASE_KIND = {"mla-trained": "mla"}
TOKENIZER_VOCAB = 512
STEPS, BATCH, SEQ_LEN, LR = 120, 10, 64, 3e-3

# One paragraph per line: every line start is a place a prompt may begin (encode_lines).
TRAINING_TEXT = (
    "Helix splits the KV cache of every request by page across ranks, so each rank holds only a"
    " part of a long context and reads only its own pages at every decode step.\n"
    "Helix parallelism shards the key value cache of a decoding request by page across ranks. "
    "Each rank computes partial attention over its own pages and a log sum exp per head. One "
    "all to all exchange carries the partial outputs, and a merge weights them exactly.\n"
    "SGLang serves large language models with a radix tree cache, a batch scheduler and fast "
    "attention kernels. The plugin adds Helix to SGLang without changing its code: start the "
    "server with the enable helix flag, and the tensor parallel ranks become KV parallel ranks.\n"
    "Multi head latent attention keeps a compressed latent vector and a small rotary part, so "
    "one latent row per token is cached. Grouped query attention lets several query heads share"
    " one key and value head.\n"
    "The quick brown fox jumps over the lazy dog and then runs into the forest to find the "
    "other foxes.\n"
    "Hello, world. How are you today? I am a tiny model, trained for a few seconds on a short "
    "text about Helix.\n"
)


def cache_fields(kind: str) -> list[Any]:
    """What a trained kind adds to its cache key (the text, the tokenizer and training settings)."""
    return [TRAINING_TEXT, TOKENIZER_VOCAB, STEPS, BATCH, SEQ_LEN, LR] if kind in BASE_KIND else []


def tokenizer_corpus(kind: str, corpus: str, vocab_size: int) -> tuple[str, int]:
    """(text, vocabulary size) the tokenizer of `kind` is trained on: a trained kind's own text,
    else the given ones."""
    return (TRAINING_TEXT, TOKENIZER_VOCAB) if kind in BASE_KIND else (corpus, vocab_size)


def encode_lines(tokenizer: Any, text: str = TRAINING_TEXT) -> tuple[list[int], list[int]]:
    """Token ids of `text`, each line (with its newline) encoded on its own as a prompt starting
    that line is; and the offset of every line's first token."""
    ids, starts = [], []
    for line in text.splitlines(keepends=True):
        starts.append(len(ids))
        ids += tokenizer.encode(line)
    return ids, starts


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on every machine size
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _batches(ids: list[int], starts: list[int], seed: int) -> Iterator[Any]:
    """[BATCH, SEQ_LEN] windows of the text read cyclically: every line start (prompts begin
    there) plus random offsets."""
    import torch

    data = torch.tensor(ids * (1 + -(-SEQ_LEN // len(ids))))
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.tensor(starts[:BATCH])
    for _ in range(STEPS):
        extra = torch.randint(0, len(ids), (BATCH - len(fixed),), generator=gen)
        yield torch.stack([data[s:s + SEQ_LEN] for s in torch.cat([fixed, extra]).tolist()])


def train_checkpoint(directory: Path, tokenizer: Any, seed: int) -> dict[str, float]:
    """Train the fp32 checkpoint in `directory` on TRAINING_TEXT (next-token loss, AdamW) and
    save it back in place (safetensors); returns {"first_loss", "last_loss", "seconds"}, also
    written to training.json there."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, starts = encode_lines(tokenizer)
    t0 = time.monotonic()
    with _one_thread():
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                     local_files_only=True)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        losses = []
        for batch in _batches(ids, starts, seed):
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        model.save_pretrained(directory, safe_serialization=True)
    stats = {"first_loss": losses[0], "last_loss": losses[-1], "seconds": time.monotonic() - t0}
    (directory / "training.json").write_text(json.dumps(
        {**stats, "steps": STEPS, "batch": BATCH, "seq_len": SEQ_LEN, "lr": LR, "text_tokens": len(ids)},
        indent=1))
    return stats
