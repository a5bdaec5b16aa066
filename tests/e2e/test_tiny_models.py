"""Fast checks of sglang_helix.dev.tiny_models (no SGLang): determinism, config fields, tokenizer,
the trained kind's greedy."""

from __future__ import annotations

import json

import pytest
from helpers import E2E_PROMPT_TEXTS

from sglang_helix.dev import tiny_models as tm
from sglang_helix.dev import trained_models


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {kind: tm.build_tiny_model(kind, base / kind) for kind in tm.KINDS}


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_build_is_deterministic_by_seed(built, tmp_path):
    again = tm.build_tiny_model("mla", tmp_path / "again")
    other = tm.build_tiny_model("mla", tmp_path / "other", seed=1)
    weights = (built["mla"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (again / "tokenizer.json").read_bytes() == (built["mla"] / "tokenizer.json").read_bytes()


def test_gqa_config(built):
    cfg = _config(built["gqa"])
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 2, 16)
    assert cfg["torch_dtype"] == "float32"


@pytest.mark.parametrize("kind, arch", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_qwen_configs_match_gqa_shape(built, kind, arch):
    cfg, gqa = _config(built[kind]), _config(built["gqa"])
    assert cfg["architectures"] == [arch]
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size"):
        assert cfg[key] == gqa[key], key
    assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]  # SGLang CPU Qwen2
    assert not cfg["use_sliding_window"] and cfg["sliding_window"] is None


def test_qwen_constant_inits_are_randomized(built):
    from safetensors.torch import load_file

    qwen2, qwen3 = (load_file(built[k] / "model.safetensors") for k in ("qwen2", "qwen3"))
    biases = [v for k, v in qwen2.items() if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 3 * 4 and all(b.abs().sum() > 0 for b in biases)  # zeros in transformers
    norms = [v for k, v in qwen3.items() if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 2 * 4 and all(n.shape == (16,) and (n - 1).abs().sum() > 0 for n in norms)
    assert not any(k.endswith(".bias") for k in qwen3)


@pytest.mark.parametrize("kind", ["mla", "mla-compat"])
def test_mla_config_has_what_sglang_needs(built, kind):
    cfg = _config(built[kind])
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["moe_layer_freq"] == 1 and cfg["first_k_dense_replace"] == 1
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["q_lora_rank"] and cfg["n_shared_experts"] >= 1 and cfg["n_routed_experts"] > 2
    assert cfg["rope_scaling"]["type"] == "yarn" == cfg["rope_parameters"]["rope_type"]


def test_mla_realistic_proportions_really_differ(built):
    real, compat = _config(built["mla"]), _config(built["mla-compat"])
    assert real["kv_lora_rank"] != real["qk_nope_head_dim"]
    assert real["kv_lora_rank"] > real["qk_nope_head_dim"] > real["qk_rope_head_dim"]
    assert compat["kv_lora_rank"] == compat["qk_nope_head_dim"]


def test_router_bias_is_nonzero(built):
    from safetensors.torch import load_file

    weights = load_file(built["mla"] / "model.safetensors")
    bias = [v for k, v in weights.items() if k.endswith("e_score_correction_bias")]
    assert bias and all(b.abs().sum() > 0 for b in bias)


def test_tokenizer_round_trip_and_chat_template(built):
    tok = tm.load_tokenizer(built["gqa"])
    assert 256 < len(tok) <= tm.TOKENIZER_VOCAB == _config(built["gqa"])["vocab_size"]
    text = "Helix shards pages; ünïcode ✓ 42!"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|bos|><|user|>Hi<|end|><|assistant|>"


def test_ensure_tiny_model_caches(tmp_path, monkeypatch):
    first = tm.ensure_tiny_model("gqa", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(tm, "build_tiny_model", lambda *a, **k: calls.append(a))
    assert tm.ensure_tiny_model("gqa", tmp_path) == first and not calls
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.name.startswith("gqa-") and first.parent == tmp_path


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tm.build_tiny_model("moe", tmp_path / "x")


def test_reference_greedy_qwen_margins(built):
    """The Qwen kinds' greedy argmax is robust enough for token-exact serving comparisons."""
    tok = tm.load_tokenizer(built["qwen3"])
    prompts = [tok.encode("Hello"), tok.encode("The quick brown fox jumps over")]
    for kind in ("qwen2", "qwen3"):
        out = tm.reference_greedy(built[kind], prompts, 4)
        assert all(len(r.tokens) == 4 and r.min_margin > 1e-3 for r in out), kind


def test_reference_greedy_shapes(built):
    tok = tm.load_tokenizer(built["mla"])
    out = tm.reference_greedy(built["mla"], [tok.encode("Hello"), tok.encode("The cat")], 3)
    assert [len(r.tokens) for r in out] == [3, 3]
    assert all(r.min_margin >= 0 and all(lp <= 0 for lp in r.logprobs) for r in out)


def test_max_positions_long_context_variant(built, tmp_path):
    """A long-context build changes only the position fields (and its own cache key); the default
    is exactly the old config, so existing cache keys and weights stay as they were."""
    for kind in tm.KINDS:
        assert tm.model_config(kind, 9, 0, 1, 2) == tm.model_config(kind, 9, 0, 1, 2, tm.MAX_POSITIONS)
        assert tm.cache_key(kind) == tm.cache_key(kind, max_positions=tm.MAX_POSITIONS)
    assert tm.cache_key("mla", max_positions=131072) != tm.cache_key("mla")
    long = tm.build_tiny_model("mla", tmp_path / "long", max_positions=131072)
    cfg, short = _config(long), _config(built["mla"])
    assert cfg["max_position_embeddings"] == 131072
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 131072 // 4
    assert short["max_position_embeddings"] == tm.MAX_POSITIONS
    differ = {k for k in cfg.keys() | short.keys() if cfg.get(k) != short.get(k)}
    assert differ == {"max_position_embeddings", "rope_scaling", "rope_parameters"}, differ
    assert (long / "model.safetensors").read_bytes() == (built["mla"] / "model.safetensors").read_bytes()
    assert tm.load_tokenizer(long).model_max_length == 131072
    with pytest.raises(ValueError, match="max_positions"):
        tm.model_config("mla", 9, 0, 1, 2, max_positions=1000001)


def test_trained_kind_continues_its_text_with_wide_margins(built):
    """"mla-trained" (the demo's model): the "mla" architecture and config keys, its own
    tokenizer, trained until greedy continues the text it was trained on; top-1 / top-2 margins
    on the e2e prompts are whole logits (a random model's are hundredths), so greedy comparisons
    between implementations are not tie-prone."""
    path = built["mla-trained"]
    cfg, base = _config(path), _config(built["mla"])
    differ = {k for k in cfg.keys() | base.keys() if cfg.get(k) != base.get(k)}
    assert differ <= {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}, differ
    stats = json.loads((path / "training.json").read_text())
    assert stats["last_loss"] < stats["first_loss"] / 10 and stats["steps"] == trained_models.STEPS
    tok = tm.load_tokenizer(path)
    assert len(tok) == trained_models.TOKENIZER_VOCAB == cfg["vocab_size"]
    text = trained_models.TRAINING_TEXT
    prompts = [*E2E_PROMPT_TEXTS, "Helix splits the KV cache of every request by page across ranks, so"]
    refs = tm.reference_greedy(path, [tok.encode(p) for p in prompts], 16)
    for prompt, ref in zip(prompts, refs):
        said = tok.decode(ref.tokens)
        start = text.index(prompt) + len(prompt)
        assert said == (text + text)[start:start + len(said)], (prompt, said)  # the text, verbatim
        assert ref.min_margin > 1.0, (prompt, ref.min_margin)
    assert tm.cache_key("mla-trained") != tm.cache_key("mla")


def test_fp8_kv_envelope_reproduces_the_reference_and_measures_rounding_flips(built):
    """The envelope's teacher-forced pass lines up with the reference's greedy steps: without
    noise every logprob is reproduced (envelope ~0); with noise, rounding flips move them."""
    from sglang_helix.dev import fp8_models as fm

    tok = tm.load_tokenizer(built["qwen2"])
    prompts = [tok.encode(text) for text in E2E_PROMPT_TEXTS]
    refs = fm.fp8_kv_reference_greedy(built["qwen2"], prompts, 6)
    model = fm.fp32_model(built["qwen2"])
    assert max(fm.fp8_kv_rounding_envelope(model, prompts, refs, seeds=1, noise_rel=0.0)) < 1e-4
    noisy = fm.fp8_kv_rounding_envelope(model, prompts, refs, seeds=2, noise_rel=1e-3)
    assert max(noisy) > 1e-3 and all(r.envelope >= 0 for r in refs)
