"""Training of the tiny EAGLE-3 draft (dev.eagle3_models) on its target's own greedy text, and
its cache (`ensure_eagle3_draft`: built next to the target on first use).

Data: the target (transformers, fp32) continues prompts greedily (prefixes of every line of the
tiny models' corpus, `PROMPT_TEXTS`, seeded random token prompts); one more forward over each whole sequence
gives the hidden states SGLang captures for the draft (the inputs of target layers id + 1 of
`eagle_aux_hidden_state_layer_ids`) and the target's greedy token at every position. The draft at
position t reads the target's embedding of token t + 1 and the captured states of position t and
learns the target's greedy token after t + 1 (EAGLE's next-next-token objective, teacher forced,
in the draft vocabulary: the DRAFT_VOCAB target tokens the target predicts most often).

A random-weight target's next token is no smooth function of its features: the draft learns its
training continuations (accuracy near 1 on them) and hardly generalises. `PROMPT_TEXTS` holds the
prompts the e2e suite and the serving benchmark send, so drafts are accepted there (often at the
first draft step; later steps read the draft's own hidden states, which it was not trained on).
Acceptance lengths measured with these drafts show the serving path works, not a draft's quality.

Deterministic: seeded data and init, one torch thread (restored after), as the trained tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import eagle3_models as em

STEPS, LR, NEW_TOKENS, RANDOM_PROMPTS = 300, 3e-3, 48, 48
# The e2e suite's prompts (tests/helpers.py).
PROMPT_TEXTS = (
    "The quick brown fox jumps over the lazy dog and then",
    "Helix parallelism shards the key value cache of a decoding request by page across ranks. "
    "Each rank",
    "Hello",
)


def cache_fields() -> list[Any]:
    """What the training adds to the draft's cache key."""
    return [STEPS, LR, NEW_TOKENS, RANDOM_PROMPTS, PROMPT_TEXTS]


def _prompts(tokenizer: Any, vocab: int, seed: int) -> list[list[int]]:
    """Prefixes (3, 8, 16 tokens and whole) of every corpus line, PROMPT_TEXTS, then random token
    prompts."""
    import torch

    from .tiny_models import CORPUS

    out = []
    for line in CORPUS.splitlines():
        ids = tokenizer.encode(line)
        out += [ids[:n] for n in (3, 8, 16) if n < len(ids)] + [ids]
    out += [tokenizer.encode(text) for text in PROMPT_TEXTS]
    gen = torch.Generator().manual_seed(seed + 11)
    for _ in range(RANDOM_PROMPTS):
        n = int(torch.randint(1, 24, (1,), generator=gen))
        out.append(torch.randint(3, vocab, (n,), generator=gen).tolist())
    return [p for p in out if p]


def target_data(target: Path, aux_layer_ids: tuple[int, ...], seed: int) -> list[tuple[Any, Any, Any]]:
    """Per greedy sequence of the target: (ids [T], aux [T, 3H], greedy [T]: the target's argmax
    after each position)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .tiny_models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32,
                                                 local_files_only=True).eval()
    prompts = _prompts(load_tokenizer(target), model.config.vocab_size, seed)
    data = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=model.config.pad_token_id)[0]
            out = model(ids[None], output_hidden_states=True)
            aux = torch.cat([out.hidden_states[i + 1][0] for i in aux_layer_ids], -1)
            data.append((ids, aux, out.logits[0].argmax(-1)))
    return data


def _examples(data, embed, t2d, draft_of):
    """Teacher-forced draft inputs of one sequence: embeds of tokens 1.., aux of 0..T-2, labels
    (the target's greedy token after each input token, in draft ids; -100 outside the draft
    vocabulary), positions."""
    import torch

    for ids, aux, greedy in data:
        label = greedy[1:]
        yield (embed[ids[1:]], aux[:-1], torch.where(t2d[label], draft_of[label], -100),
               torch.arange(ids.numel() - 1))


def train_draft(target: Path, out: Path, seed: int) -> dict[str, float]:
    """Train and save the draft of `target` into `out`; returns first / last loss, accuracy on
    the training sequences (top-1, draft vocabulary) and seconds."""
    import torch
    from safetensors.torch import load_file

    t0, saved = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target_cfg = json.loads((target / "config.json").read_text())
        cfg = em.eagle3_config(target_cfg)
        data = target_data(target, em.AUX_LAYER_IDS, seed)
        counts = torch.bincount(torch.cat([g for _, _, g in data]), minlength=cfg["vocab_size"])
        hot = counts.argsort(descending=True, stable=True)[: cfg["draft_vocab_size"]].tolist()
        d2t, t2d = em.vocab_maps(hot, cfg["vocab_size"])
        draft_of = torch.cumsum(t2d.long(), 0) - 1  # target id -> draft id (where t2d)
        embed = load_file(target / "model.safetensors")["model.embed_tokens.weight"].float()
        examples = list(_examples(data, embed, t2d, draft_of))
        weights = em.init_weights(cfg, seed, target_cfg.get("initializer_range", 0.02))
        losses, accuracy = _fit(weights, cfg, examples, seed)
        em.save_draft(out, cfg, weights, d2t, t2d)
    finally:
        torch.set_num_threads(saved)
    return {"first_loss": losses[0], "last_loss": losses[-1], "train_accuracy": accuracy,
            "sequences": len(data), "seconds": time.monotonic() - t0}


def _fit(weights, cfg, examples, seed) -> tuple[list[float], float]:
    """AdamW over mini-batches of 8 sequences; returns the losses and the final accuracy."""
    import torch

    from .eagle3_models import draft_forward

    opt = torch.optim.AdamW(list(weights.values()), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 13)
    losses = []
    for _ in range(STEPS):
        pick = torch.randperm(len(examples), generator=gen)[:8].tolist()
        loss = sum(_loss(weights, cfg, examples[i]) for i in pick) / len(pick)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        hits = total = 0
        for emb, aux, label, pos in examples:
            logits, _ = draft_forward(weights, cfg, emb, aux, pos)
            keep = label >= 0
            hits += int((logits.argmax(-1)[keep] == label[keep]).sum())
            total += int(keep.sum())
    return losses, hits / max(total, 1)


def _loss(weights, cfg, example):
    import torch

    from .eagle3_models import draft_forward

    emb, aux, label, pos = example
    logits, _ = draft_forward(weights, cfg, emb, aux, pos)
    return torch.nn.functional.cross_entropy(logits, label, ignore_index=-100)


def build_eagle3_draft(target: str | os.PathLike[str], path: str | os.PathLike[str], *,
                       seed: int = 0) -> Path:
    """Train an EAGLE-3 draft for the tiny Llama at `target` and write it to `path` (atomically)."""
    target, path = Path(target), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        stats = train_draft(target, work, seed)
        (work / "sglang_helix_eagle3.json").write_text(json.dumps(
            {"target": target.name, "seed": seed, "builder_version": em.BUILDER_VERSION, **stats}, indent=1))
        if path.exists():
            shutil.rmtree(path)
        work.rename(path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


def ensure_eagle3_draft(target: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """The cached draft of the tiny Llama at `target` (built next to it on first use; the target
    directory's name, a content hash of the tiny models' cache, and the training settings are the
    key)."""
    target = Path(target)
    blob = json.dumps([em.BUILDER_VERSION, target.name, seed, em.DRAFT_VOCAB, em.AUX_LAYER_IDS,
                       *cache_fields()])
    path = target.parent / f"{target.name}-eagle3-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    if not all((path / f).is_file() for f in ("config.json", "model.safetensors", "sglang_helix_eagle3.json")):
        build_eagle3_draft(target, path, seed=seed)
    return path
