"""Tiny random-weight models built locally (no model hub) for SGLang tests and demos.

Twelve kinds (fp32 by default, weights from transformers' own model classes, seeded):

- ``"gqa"``: Llama-style GQA. hidden 64, 4 layers, 8 query heads, 2 KV heads, head_dim 16.
- ``"qwen2"``: Qwen2ForCausalLM, the same heads (hidden 128 = 8 x 16), with q/k/v bias (random, not transformers'
  zero init, so sharding the bias is exercised).
- ``"qwen3"``: Qwen3ForCausalLM, the same as qwen2 without bias, with per-head q/k RMSNorm (random weights
  around 1, not transformers' ones).
- ``"mla"``: DeepSeek-V3-style MLA + MoE with *realistic proportions*: ``kv_lora_rank`` 48 !=
  ``qk_nope_head_dim`` 24 (DeepSeek-V3: 512 / 128), rope dim 8, ``q_lora_rank`` 32, first layer
  dense then MoE on every layer (``moe_layer_freq=1``), 4 routed experts in 2 groups (top-2, one
  group kept), 1 shared expert, ``topk_method="noaux_tc"``, ``scoring_func="sigmoid"``, a non-zero
  ``e_score_correction_bias``, yarn rope (SGLang's CPU rope factory accepts only ``deepseek_yarn``).
  SGLang 0.5.23's own CPU torch_native path cannot serve this shape; the plugin's CPU
  absorbed-MLA fix (sglang_helix.srt.cpu.mla_fix) makes it serve, Helix on or off.
- ``"mla-compat"``: the same with ``kv_lora_rank == qk_nope_head_dim`` (32 / 32): the only MLA
  shape SGLang's own CPU torch_native path starts with (with wrong tokens).
- ``"mla-mtp"``: ``"mla"`` (same weights) plus a DeepSeek-V3 MTP layer for NEXTN drafts (dev.mtp_models).
- ``"mla-fp8"``, ``"qwen3-fp8"``: block-fp8 checkpoints (128 x 128 blocks: the on-disk format of
  DeepSeek-V3 and Qwen3-FP8, dev.fp8_models) of an MLA + MoE and a Qwen3 GQA model whose sharded
  dims are 128-aligned; ``"gqa-fp8-tensor"`` (AutoFP8 per-tensor), ``"qwen3-fp8-ct"``
  (compressed-tensors FP8-dynamic): ``"gqa"`` and ``"qwen3"`` in those formats; ``"mla-nvfp4"``:
  ``"mla-fp8"``'s model in NVIDIA's ModelOpt NVFP4 export format (dev.nvfp4_models).
- ``"mla-trained"``: ``"mla"`` trained for a few seconds on a short text (dev.trained_models), its own
  tokenizer trained on that text: greedy continuations are words, and margins are wide.

Every directory holds config.json, model.safetensors, generation_config.json and a byte-level BPE
tokenizer trained here on a built-in corpus (a few hundred tokens) with a chat template, so
``/v1/chat/completions`` works.

Random init uses a larger ``initializer_range`` than real models (0.2 instead of 0.02) so that
greedy top-1 / top-2 logit margins are wide enough for token-exact comparisons between
implementations; ``reference_greedy`` reports the smallest margin so tests can check it.

``max_positions`` (default 1024) sets ``max_position_embeddings`` for long contexts; same weights.

API: ``build_tiny_model``, ``ensure_tiny_model`` (cached in ~/.cache/sglang_helix/tiny), ``reference_greedy``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fp8_models, mtp_models, nvfp4_models, trained_models

# Bump when anything that changes the built files changes: it is part of the cache key.
BUILDER_VERSION = 1
KINDS = ("gqa", "qwen2", "qwen3", "mla", "mla-compat", "mla-fp8", "qwen3-fp8", "mla-mtp", "mla-trained",
         "gqa-fp8-tensor", "qwen3-fp8-ct", "mla-nvfp4")
TOKENIZER_VOCAB = 384
INIT_RANGE = 0.2
MAX_POSITIONS = 1024
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")

# A small template in the style of ChatML; generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CORPUS = """\
Helix parallelism shards the key value cache of a decoding request by page across ranks.
Each rank computes partial attention over its own pages and a log sum exp per head.
One all to all exchange carries the partial outputs, and a merge weights them exactly.
The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat.
Tensor parallel attention splits heads; expert parallel layers route tokens to experts.
Multi head latent attention keeps a compressed latent vector and a small rotary part.
Grouped query attention lets several query heads share one key and value head.
A radix tree caches prompt prefixes so that repeated requests reuse pages of memory.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096.
Punctuation, quotes "like this", parentheses (and brackets [x]), colons: semicolons; done!
Hello, world. How are you today? I am a tiny model with random weights and no knowledge.
def add(a, b):\n    return a + b\nprint(add(2, 3))
The scheduler batches requests; the detokenizer turns token ids back into text.
"""


# ---------------------------------------------------------------- configs


def _common_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                   max_positions: int = MAX_POSITIONS) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "max_position_embeddings": max_positions,
            "initializer_range": INIT_RANGE, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}


def gqa_config(common: dict[str, Any]) -> dict[str, Any]:
    """Llama-style: H=8 query heads, K=2 KV heads, D=16 (so TPA in {1, 2}, TP in {1, 2, 4, 8})."""
    return {
        **common,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }


def qwen_config(common: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3: H=8, K=2, D=16 as gqa_config, but hidden 128 = H x D (as in real Qwen
    checkpoints): SGLang 0.5.23's Qwen2 layer takes D = hidden / H whenever the CPU engine set
    `original_num_attention_heads` (TP > 1), ignoring `head_dim`. Full attention, no sliding window."""
    cfg = {**gqa_config(common), "hidden_size": 128, "intermediate_size": 256,
           "use_sliding_window": False, "sliding_window": None}
    for key in ("attention_bias", "mlp_bias"):  # Qwen2: q/k/v bias always; Qwen3: none
        cfg.pop(key)
    return cfg


def mla_config(common: dict[str, Any], *, kv_lora_rank: int, qk_nope_head_dim: int) -> dict[str, Any]:
    """DeepSeek-V3-style MLA + MoE; the fields SGLang 0.5.23 needs are set explicitly."""
    return {
        **common,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": qk_nope_head_dim, "qk_rope_head_dim": 8,
        "v_head_dim": qk_nope_head_dim, "head_dim": 8,  # head_dim = rope dim, as in DeepSeek-V3
        "hidden_act": "silu", "attention_bias": False, "rope_interleave": True,
        # MoE: layer 0 dense, then MoE on every layer; 4 experts in 2 groups, top-2 from 1 group.
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "moe_intermediate_size": 32, "n_group": 2, "topk_group": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0,
        # SGLang's CPU rope factory asserts deepseek_yarn (it renames "yarn" to that).
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": common["max_position_embeddings"] // 4,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
    }


def model_config(kind: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                 max_positions: int = MAX_POSITIONS) -> dict[str, Any]:
    """The HF config fields of `kind` (architecture fields are added by the model class).

    `max_positions` sets max_position_embeddings (and the yarn rope's original length, a quarter
    of it); the default keeps every kind exactly as it was (same config, same cache key).
    """
    _check_kind(kind)
    _check_max_positions(max_positions)
    kind = trained_models.BASE_KIND.get(kind, kind)
    if kind == "mla-nvfp4":  # mla-fp8's model, in NVFP4's format
        return model_config("mla-fp8", vocab_size, bos_id, eos_id, pad_id, max_positions)
    if kind in fp8_models.FORMAT_KINDS:  # an fp8 kind: its base kind's config, resized
        base = model_config(fp8_models.BASE_KIND[kind], vocab_size, bos_id, eos_id, pad_id, max_positions)
        return fp8_models.fp8_kind_config(kind, base)
    common = _common_config(vocab_size, bos_id, eos_id, pad_id, max_positions)
    if kind == "gqa":
        return gqa_config(common)
    if kind in ("qwen2", "qwen3"):
        return qwen_config(common)
    if kind in ("mla", "mla-mtp"):
        cfg = mla_config(common, kv_lora_rank=48, qk_nope_head_dim=24)
        return mtp_models.mtp_config(cfg) if kind == "mla-mtp" else cfg
    return mla_config(common, kv_lora_rank=32, qk_nope_head_dim=32)


def _default_dtype(kind: str) -> str:  # SGLang's fp8 / fp4 methods run bf16/fp16 activations only
    return "bfloat16" if kind in fp8_models.FORMAT_KINDS or kind == "mla-nvfp4" else "float32"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {KINDS}")


def _check_max_positions(max_positions: int) -> None:
    if not isinstance(max_positions, int) or max_positions < 64 or max_positions % 4:
        raise ValueError(f"max_positions must be an int >= 64 and a multiple of 4, got {max_positions!r}")


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(directory: Path, max_positions: int = MAX_POSITIONS, corpus: str = CORPUS,
                    vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """Train a byte-level BPE on `corpus` and save it (tokenizer.json + config) into `directory`.

    Returns the transformers fast tokenizer. Deterministic: BPE training on a fixed corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer of a built tiny model (transformers AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------- weights


# Tensors transformers initialises to constants that real checkpoints learn; randomised so the
# code paths using them are exercised: name suffix -> (offset, scale) of offset + scale * N(0, 1).
_RANDOMIZED = {
    "e_score_correction_bias": (0.0, 0.1),  # noaux_tc routing bias (zeros)
    "q_proj.bias": (0.0, 0.1), "k_proj.bias": (0.0, 0.1), "v_proj.bias": (0.0, 0.1),  # Qwen2
    "q_norm.weight": (1.0, 0.2), "k_norm.weight": (1.0, 0.2),  # Qwen3 per-head RMSNorm (ones)
}


def _model_class(kind: str) -> tuple[Any, Any]:
    """transformers' config and model classes of `kind`'s family."""
    import transformers

    family = {"gqa": "Llama", "qwen2": "Qwen2"}.get(fp8_models.BASE_KIND.get(kind, kind)) or (
        "Qwen3" if kind.startswith("qwen3") else "DeepseekV3")
    return getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")


def _randomize_constant_init(model: Any, generator: Any) -> None:
    """Overwrite the constant-initialised tensors named in _RANDOMIZED (seeded, in place)."""
    import torch

    tensors = [*model.named_buffers(), *model.named_parameters()]
    for name, tensor in tensors:
        for suffix, (offset, scale) in _RANDOMIZED.items():
            if name.endswith(suffix):
                tensor.data.copy_(offset + torch.randn(tensor.shape, generator=generator) * scale)


def build_weights(kind: str, cfg: dict[str, Any], directory: Path, seed: int, dtype: str) -> None:
    """Instantiate the transformers model with seeded random init and save safetensors."""
    import torch

    config_cls, model_cls = _model_class(kind)
    config = config_cls(**copy.deepcopy(cfg))
    # Extra keys SGLang reads but transformers' config class does not define.
    for key in ("moe_layer_freq", "topk_method", "scoring_func"):
        if key in cfg:
            setattr(config, key, cfg[key])
    torch.manual_seed(seed)
    with torch.no_grad():
        model = model_cls(config).to(getattr(torch, dtype))
        _randomize_constant_init(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(directory, safe_serialization=True)


# ---------------------------------------------------------------- build / cache


def build_tiny_model(
    kind: str, path: str | os.PathLike[str], *, seed: int = 0, dtype: str | None = None,
    max_positions: int = MAX_POSITIONS,
) -> Path:
    """Build tiny model `kind` into directory `path` (created; existing files replaced).

    `max_positions`: max_position_embeddings of the model and the tokenizer's model_max_length
    (e.g. 131072 for long-context serving benchmarks; the weights do not depend on it).

    Writes into a temp sibling and renames, so a crash never leaves a half-built model at `path`.
    """
    _check_kind(kind)
    _check_max_positions(max_positions)
    dtype = dtype or _default_dtype(kind)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        trained = kind in trained_models.BASE_KIND
        corpus, vocab = trained_models.tokenizer_corpus(kind, CORPUS, TOKENIZER_VOCAB)
        tok = train_tokenizer(work, max_positions, corpus, vocab)
        ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
        cfg = model_config(kind, len(tok), ids[BOS], ids[EOS], ids[PAD], max_positions)
        build_weights(kind, cfg, work, seed, dtype)
        if trained:  # before _finish_config: saving the trained model rewrites config.json
            trained_models.train_checkpoint(work, tok, seed)
        _finish_config(work, cfg, dtype)
        if kind == "mla-nvfp4":
            nvfp4_models.quantize_checkpoint(work)
        elif kind in fp8_models.FORMAT_KINDS:
            fp8_models.quantize_checkpoint(work, fmt=fp8_models.FORMAT_KINDS[kind])
        if kind == "mla-mtp":
            mtp_models.add_mtp_layer(work, seed, INIT_RANGE)
        (work / "sglang_helix_tiny.json").write_text(
            json.dumps({"kind": kind, "seed": seed, "dtype": dtype,
                        "builder_version": BUILDER_VERSION, "max_positions": max_positions},
                       indent=1)
        )
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _finish_config(directory: Path, cfg: dict[str, Any], dtype: str) -> None:
    """Make config.json carry what SGLang reads, whatever transformers chose to serialise.

    Also writes `rope_scaling` (the pre-transformers-5 spelling) next to `rope_parameters` for
    readers that still look there.
    """
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key in ("moe_layer_freq", "topk_method", "scoring_func", "n_group", "topk_group"):
        if key in cfg:
            data[key] = cfg[key]
    rope = cfg["rope_parameters"]
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    data["torch_dtype"] = data["dtype"] = dtype
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def cache_key(kind: str, seed: int = 0, dtype: str = "float32",
              max_positions: int = MAX_POSITIONS) -> str:
    """Short hash of everything that determines the built files (max_positions enters through
    the model config, so the default leaves the key of every kind unchanged)."""
    import tokenizers
    import transformers

    blob = json.dumps(
        [BUILDER_VERSION, kind, seed, dtype, CORPUS, CHAT_TEMPLATE, TOKENIZER_VOCAB, INIT_RANGE,
         model_config(kind, 0, 0, 1, 2, max_positions), transformers.__version__, tokenizers.__version__,
         *trained_models.cache_fields(kind)],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """SGLANG_HELIX_CACHE or ~/.cache/sglang_helix, plus /tiny."""
    root = os.environ.get("SGLANG_HELIX_CACHE") or Path.home() / ".cache" / "sglang_helix"
    return Path(root) / "tiny"


def ensure_tiny_model(
    kind: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
    dtype: str | None = None, max_positions: int = MAX_POSITIONS,
) -> Path:
    """Path of the cached tiny model `kind`, building it only when missing or incomplete.

    A non-default `max_positions` (long-context variant, same weights) gets its own cache entry.
    `dtype` defaults to float32, bfloat16 for the quantized kinds (their unquantized tensors).
    """
    _check_kind(kind)
    dtype = dtype or _default_dtype(kind)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = base / f"{kind}-{cache_key(kind, seed, dtype, max_positions)}"
    if not _is_complete(path):
        build_tiny_model(kind, path, seed=seed, dtype=dtype, max_positions=max_positions)
    return path


def _is_complete(path: Path) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json", "sglang_helix_tiny.json")
    return all((path / name).is_file() for name in needed)


# ---------------------------------------------------------------- reference


@dataclass(frozen=True)
class GreedyResult:
    """Greedy continuation of one prompt by transformers (fp32).

    tokens: generated ids (len <= max_new_tokens; stops after EOS).
    logprobs: log-softmax of each chosen token.
    min_margin: smallest top-1 minus top-2 logit gap over the steps (how robust the argmax is).
    """

    tokens: list[int]
    logprobs: list[float]
    min_margin: float


def reference_greedy(
    path: str | os.PathLike[str], prompts_token_ids: list[list[int]], max_new_tokens: int,
    *, ignore_eos: bool = True,
) -> list[GreedyResult]:
    """Greedy decode each prompt with transformers' own model, in fp32, one prompt at a time.

    An independent reference: no SGLang code, full recomputation each step (no KV cache reuse
    bugs can hide). Logits per step: [vocab]. `ignore_eos` matches SGLang's `ignore_eos`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True
    ).eval()
    eos = model.config.eos_token_id
    out = []
    with torch.no_grad():
        for prompt in prompts_token_ids:
            out.append(_greedy_one(model, prompt, max_new_tokens, None if ignore_eos else eos))
    return out


def _greedy_one(model: Any, prompt: list[int], n: int, eos: int | None) -> GreedyResult:
    import torch

    if not prompt:
        raise ValueError("empty prompt")
    ids = list(prompt)
    tokens, logprobs, margin = [], [], float("inf")
    for _ in range(n):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()  # [vocab]
        top2 = torch.topk(logits, 2)
        token = int(top2.indices[0])
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        tokens.append(token)
        ids.append(token)
        if eos is not None and token == eos:
            break
    return GreedyResult(tokens, logprobs, margin)
