"""The launch rules of sglang_helix.rules (flags, defaults, refusals, the whole-launch check).

No SGLang import, no model load: every test runs in milliseconds. Each refusal goes through
`check_launch`, the one function the plugin and the planner call.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from sglang_helix.config import HelixConfig, HelixConfigError, describe
from sglang_helix.rules import check_launch, check_server_flags
from sglang_helix.rules.argv import (add_helix_group, check_argv, layout_from_argv, parse_helix_argv,
                                     parse_helix_env)
from sglang_helix.rules.flags import GROUP_TITLE, HelixServerArgs
from sglang_helix.rules.graphs import decode_graph_blocker
from sglang_helix.rules.kv_cache import HELIX_DEFAULT_PAGE_SIZE, check_page_size, helix_page_size
from sglang_helix.rules.model import ModelInfo, check_mla_weights, is_unquantized_weight, weight_dtype_name
from sglang_helix.rules.pd import HELIX_RETRACTION_BACKUP, helix_retraction_backup
from sglang_helix.rules.server import ServerLayout
from sglang_helix.rules.sizes import default_tpa

LLAMA = ModelInfo("LlamaForCausalLM", num_heads=32, num_kv_heads=8, is_mla=False)
DSV3 = ModelInfo("DeepseekV3ForCausalLM", num_heads=16, num_kv_heads=1, is_mla=True)


def helix(**kw):
    return HelixServerArgs(enable_helix=True, **kw)


def server(tp=4, **kw):
    kw.setdefault("device", "cpu")
    return ServerLayout(tp_size=tp, **kw)


def refused(match, helix_args, srv, model=LLAMA):
    with pytest.raises(HelixConfigError, match=match) as err:
        check_launch(helix_args, srv, model)
    assert str(err.value).startswith("Helix: ")


# ------------------------------------------------------------------ flags


def test_group_and_flags_parse():
    parser = argparse.ArgumentParser()
    add_helix_group(parser)
    add_helix_group(parser)  # idempotent
    titles = [g.title for g in parser._action_groups]
    assert titles.count(GROUP_TITLE) == 1
    got = parse_helix_argv(
        ["--model-path", "x", "--enable-helix", "--helix-kvp-size", "2", "--helix-tpa-size", "2",
         "--helix-comm-backend", "ag_rs", "--helix-hopb-slices", "3", "--tp-size", "4"]
    )
    assert got == HelixServerArgs(True, 2, 2, "ag_rs", 3)


def test_bad_comm_backend_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse_helix_argv(["--enable-helix", "--helix-comm-backend", "nccl"])


def test_env_var_uses_same_flags():
    assert parse_helix_env(None) is None
    assert parse_helix_env("  ") is None
    assert parse_helix_env("--enable-helix --helix-kvp-size 4") == helix(helix_kvp_size=4)


def test_helix_flags_without_enable_refused():
    with pytest.raises(HelixConfigError, match="--helix-kvp-size.*without --enable-helix"):
        HelixServerArgs(helix_kvp_size=2)


@pytest.mark.parametrize(
    "kw, flag",
    [({"helix_kvp_size": 0}, "--helix-kvp-size"), ({"helix_tpa_size": -1}, "--helix-tpa-size"),
     ({"helix_hopb_slices": 0}, "--helix-hopb-slices"), ({"helix_comm_backend": "x"}, "--helix-comm-backend")],
)
def test_bad_flag_values_name_the_flag(kw, flag):
    with pytest.raises(HelixConfigError, match=flag):
        helix(**kw)


def test_disabled_is_noop():
    assert check_launch(HelixServerArgs(), server(pp_size=4, dcp_size=8), LLAMA) is None


# ------------------------------------------------------------------ model info


def test_model_info_from_hf_config():
    llama = ModelInfo.from_hf_config(
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32, "num_key_value_heads": 8}
    )
    assert llama == LLAMA
    mha = ModelInfo.from_hf_config({"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 12})
    assert mha.num_kv_heads == 12 and not mha.is_mla
    ds = ModelInfo.from_hf_config(
        {"architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 16,
         "num_key_value_heads": 16, "kv_lora_rank": 512}
    )
    assert ds == DSV3


# ------------------------------------------------------------------ defaults


def test_default_mla_tpa1_kvp_tp():
    cfg = check_launch(helix(), server(tp=4), DSV3)
    assert (cfg.kvp, cfg.tpa, cfg.mla) == (4, 1, True)


def test_default_gqa_largest_valid_tpa():
    cfg = check_launch(helix(), server(tp=8), ModelInfo("LlamaForCausalLM", 32, 4, False))
    assert (cfg.tpa, cfg.kvp) == (4, 2)  # TPA <= K=4, KVP = TP / TPA


def test_default_gqa_tpa_limited_by_tp_and_heads():
    assert default_tpa(2, LLAMA) == 2  # TP % TPA
    assert default_tpa(8, ModelInfo("Qwen2ForCausalLM", 28, 4, False)) == 4
    assert default_tpa(6, ModelInfo("Qwen2ForCausalLM", 12, 4, False)) == 2  # 6 % 4 != 0


def test_default_only_kvp_given_derives_tpa():
    cfg = check_launch(helix(helix_kvp_size=4), server(tp=8), LLAMA)
    assert (cfg.kvp, cfg.tpa) == (4, 2)


def test_default_only_tpa_given_derives_kvp():
    cfg = check_launch(helix(helix_tpa_size=1), server(tp=4), LLAMA)
    assert (cfg.kvp, cfg.tpa) == (4, 1)


def test_layout_carries_page_size_and_comm():
    cfg = check_launch(
        helix(helix_comm_backend="ag_rs", helix_hopb_slices=2), server(tp=2, page_size=16), DSV3
    )
    assert (cfg.page_size, cfg.comm_backend, cfg.hopb_slices) == (16, "ag_rs", 2)


def test_mla_exchange_flag_default_and_value():
    from sglang_helix.config import DEFAULT_MLA_EXCHANGE

    assert parse_helix_argv(["--enable-helix", "--helix-mla-exchange", "value"]) == \
        helix(helix_mla_exchange="value")
    assert check_launch(helix(), server(tp=2), DSV3).mla_exchange == DEFAULT_MLA_EXCHANGE
    cfg = check_launch(helix(helix_mla_exchange="value"), server(tp=2), DSV3)
    assert cfg.mla_exchange == "value" and "mla_exchange=value" in describe(cfg)
    assert check_launch(helix(), server(tp=4), LLAMA).mla_exchange == "latent"
    with pytest.raises(SystemExit):  # argparse choices
        parse_helix_argv(["--enable-helix", "--helix-mla-exchange", "values"])
    with pytest.raises(HelixConfigError, match="--helix-mla-exchange 'x'"):
        helix(helix_mla_exchange="x")
    with pytest.raises(HelixConfigError, match="--helix-mla-exchange.*without --enable-helix"):
        HelixServerArgs(helix_mla_exchange="value")


def test_exchange_dtype_flag_default_and_activation():
    from sglang_helix.config import DEFAULT_EXCHANGE_DTYPE

    assert DEFAULT_EXCHANGE_DTYPE == "fp32"
    for model, tp in ((DSV3, 2), (LLAMA, 4)):
        assert check_launch(helix(), server(tp=tp), model).exchange_dtype == "fp32"
        args = parse_helix_argv(["--enable-helix", "--helix-exchange-dtype", "activation"])
        assert args == helix(helix_exchange_dtype="activation")
        cfg = check_launch(args, server(tp=tp), model)
        assert cfg.exchange_dtype == "activation" and "exchange_dtype=activation" in describe(cfg)
    with pytest.raises(SystemExit):  # argparse choices
        parse_helix_argv(["--enable-helix", "--helix-exchange-dtype", "bf16"])
    with pytest.raises(HelixConfigError, match="--helix-exchange-dtype 'bf16': choose one of fp32, activation"):
        helix(helix_exchange_dtype="bf16")
    with pytest.raises(HelixConfigError, match="--helix-exchange-dtype.*without --enable-helix"):
        HelixServerArgs(helix_exchange_dtype="activation")


@pytest.mark.parametrize("mode", ["value", "latent"])
def test_refuse_mla_exchange_for_gqa(mode):
    refused(rf"--helix-mla-exchange {mode} applies to MLA models only.*drop --helix-mla-exchange",
            helix(helix_mla_exchange=mode), server(tp=4))


# ------------------------------------------------------------------ refusals


def test_refuse_kvp_times_tpa_not_tp():
    refused(r"--helix-kvp-size 2 x --helix-tpa-size 4 = 8 != --tp-size 4",
            helix(helix_kvp_size=2, helix_tpa_size=4), server(tp=4))


def test_refuse_size_not_dividing_tp():
    refused(r"--helix-kvp-size 3 does not divide --tp-size 4", helix(helix_kvp_size=3), server(tp=4))


def test_refuse_tpa_above_kv_heads():
    model = ModelInfo("LlamaForCausalLM", 16, 2, False)
    refused(r"--helix-tpa-size 4 > the model's 2 KV heads", helix(helix_tpa_size=4), server(tp=4), model)


def test_refuse_heads_not_divisible_by_tpa():
    model = ModelInfo("LlamaForCausalLM", 12, 8, False)  # 12 % 8 != 0
    refused(r"--helix-tpa-size 8 must divide both", helix(helix_tpa_size=8), server(tp=8), model)


def test_refuse_heads_not_divisible_by_tp():
    model = ModelInfo("LlamaForCausalLM", 12, 2, False)
    refused(r"--tp-size 8 does not divide the model's 12 query heads",
            helix(helix_tpa_size=2), server(tp=8), model)


def test_refuse_tpa_not_one_for_mla():
    refused(r"--helix-tpa-size 2 with MLA.*--helix-tpa-size 1 --helix-kvp-size 4",
            helix(helix_tpa_size=2), server(tp=4), DSV3)


DSV3_MOE = ModelInfo("DeepseekV3ForCausalLM", num_heads=16, num_kv_heads=1, is_mla=True, num_experts=256)


@pytest.mark.parametrize("tp, ep", [(2, 2), (4, 2), (4, 4), (8, 8), (8, 1)])
def test_ep_size_dividing_tp_and_experts_accepted(tp, ep):
    cfg = check_launch(helix(), server(tp=tp, ep_size=ep), DSV3_MOE)
    assert cfg.kvp * cfg.tpa == tp  # the FFN's TP x EP shares the same N ranks


@pytest.mark.parametrize("tp, ep", [(4, 3), (2, 4), (4, 8), (4, 0)])
def test_refuse_ep_size_not_dividing_tp(tp, ep):
    refused(rf"--ep-size {ep} must divide --tp-size {tp}.*FFN runs as TP x EP on the same "
            rf"{tp} ranks as attention; pick such an --ep-size", helix(), server(tp=tp, ep_size=ep),
            DSV3_MOE)


def test_refuse_ep_size_not_dividing_the_routed_experts():
    model = ModelInfo("DeepseekV3ForCausalLM", 16, 1, True, num_experts=6)
    refused(r"--ep-size 4 must divide --tp-size 4 and the 6 routed experts", helix(),
            server(tp=4, ep_size=4), model)
    check_launch(helix(), server(tp=4, ep_size=2), model)


def test_model_info_reads_routed_experts():
    base = {"architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 4, "kv_lora_rank": 48}
    assert ModelInfo.from_hf_config({**base, "n_routed_experts": 4}).num_experts == 4
    assert ModelInfo.from_hf_config(base).num_experts == 0


def test_check_launch_accepts_ep_size_lines():
    argv = ["--model-path", "m", "--tp-size", "4", "--ep-size", "4", "--enable-helix"]
    assert layout_from_argv(argv).ep_size == 4
    assert layout_from_argv(["--tp-size", "4", "--expert-parallel-size", "2"]).ep_size == 2
    assert check_launch(parse_helix_argv(argv), layout_from_argv(argv), DSV3).kvp == 4
    bad = ["--model-path", "m", "--tp-size", "4", "--ep-size", "3", "--enable-helix"]
    with pytest.raises(HelixConfigError, match=r"--ep-size 3 must divide --tp-size 4"):
        check_launch(parse_helix_argv(bad), layout_from_argv(bad), DSV3)


def test_refuse_dcp():
    refused(r"--dcp-size 2", helix(), server(dcp_size=2))


def test_refuse_prefill_cp():
    refused(r"--enable-prefill-cp", helix(), server(enable_prefill_cp=True))


def test_refuse_attn_cp():
    refused(r"--attn-cp-size 2", helix(), server(attn_cp_size=2))


@pytest.mark.parametrize("spelling", [dict(attn_dp_size=2), dict(dp_size=2, enable_dp_attention=True)],
                         ids=["attn-dp-size", "enable-dp-attention"])
def test_dp_attention_shards_each_attention_group_on_mla(spelling):
    """DP attention of D groups: each group of --tp-size / D ranks is one Helix group (KVP x TPA =
    TP / D; SGLang's deprecated spelling --enable-dp-attention --dp-size D reads the same); the FFN
    keeps --ep-size over all --tp-size ranks."""
    layout = server(tp=8, ep_size=8, **spelling)
    assert (layout.attention_dp_size, layout.attention_tp_size, layout.dp_replicas) == (2, 4, 1)
    cfg = check_launch(helix(), layout, DSV3)
    assert (cfg.kvp, cfg.tpa, cfg.world_size) == (4, 1, 4)
    assert check_launch(helix(helix_kvp_size=4), layout, DSV3).kvp == 4
    refused(r"--helix-kvp-size 8 x --helix-tpa-size 1 = 8 != --tp-size 8 / 2 DP-attention groups = 4"
            r".*set --tp-size 16", helix(helix_kvp_size=8, helix_tpa_size=1), layout, DSV3)
    refused(r"--attn-dp-size 3 does not divide --tp-size 8", helix(), server(tp=8, attn_dp_size=3), DSV3)


def test_refuse_dp_attention_on_gqa():
    refused(r"--attn-dp-size 2 .* with the GQA model LlamaForCausalLM: Helix runs DP attention for "
            r"DeepSeek MLA models only.*--dp-size 2 replicas", helix(), server(tp=8, attn_dp_size=2))


def test_dp_replicas_and_pipeline_stages_keep_the_tp_layout():
    """--dp-size without DP attention (replicas) and --pp-size: each replica's / stage's TP group
    is one Helix group of --tp-size ranks."""
    replicas = server(tp=4, dp_size=2)
    assert (replicas.dp_replicas, replicas.attention_tp_size) == (2, 4)
    assert check_launch(helix(), replicas, LLAMA).world_size == 4
    assert check_launch(helix(), server(tp=4, pp_size=2), LLAMA).world_size == 4
    assert check_launch(helix(), server(tp=4, pp_size=2), DSV3).kvp == 4


def test_mixed_chunk_is_served():
    """Decode rows ride in a chunk's batch as 1-token extends over their KV-sharded prefix."""
    for model in (LLAMA, DSV3):
        assert check_launch(helix(), server(enable_mixed_chunk=True, chunked_prefill_size=16), model)


@pytest.mark.parametrize("algo", ["STANDALONE", "DFLASH"])
def test_refuse_speculative_other_than_ngram_nextn_and_eagle(algo):
    refused(rf"--speculative-algorithm {algo}: with Helix only NGRAM .*, NEXTN .*, EAGLE and EAGLE3 .*"
            r"--speculative-algorithm NGRAM", helix(), server(speculative_algorithm=algo))


MTP = dict(speculative_eagle_topk=1, speculative_num_steps=3, speculative_num_draft_tokens=4)


@pytest.mark.parametrize("algo", ["NEXTN", "EAGLE"])  # SGLang resolves NEXTN to EAGLE
@pytest.mark.parametrize("steps", [1, 3])
def test_nextn_chains_accepted_on_mla(algo, steps):
    chain = dict(MTP, speculative_num_steps=steps, speculative_num_draft_tokens=steps + 1)
    assert check_launch(helix(), server(speculative_algorithm=algo, **chain), DSV3).mla
    same = server(speculative_algorithm=algo, model_path="/m", speculative_draft_model_path="/m", **chain)
    assert check_launch(helix(), same, DSV3).mla  # the draft is the checkpoint itself
    argv = ["--tp-size", "4", "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3"]
    assert check_launch(helix(), layout_from_argv(argv), DSV3) is not None  # others not given yet


def test_trees_accepted_and_unmatched_chain_draft_tokens_refused():
    tree = {**MTP, "speculative_eagle_topk": 2}
    assert check_launch(helix(), server(speculative_algorithm="NEXTN", **tree), DSV3).mla
    assert check_launch(helix(), server(speculative_algorithm="NEXTN", **{**tree, "speculative_num_draft_tokens": 6}),
                        DSV3).mla  # a tree verifies any node count
    refused(r"--speculative-num-draft-tokens 8 with --speculative-num-steps 3 and --speculative-eagle-topk 1: "
            r".* verifies 4 tokens; set --speculative-num-draft-tokens 4", helix(),
            server(speculative_algorithm="NEXTN", **{**MTP, "speculative_num_draft_tokens": 8}), model=DSV3)
    argv = ["--tp-size", "4", "--speculative-algorithm", "NEXTN", "--speculative-eagle-topk", "4"]
    assert check_launch(helix(), layout_from_argv(argv), DSV3) is not None


@pytest.mark.parametrize("algo", ["EAGLE3", "EAGLE"])
@pytest.mark.parametrize("topk", [1, 2])
def test_eagle_draft_models_accepted_on_gqa(algo, topk):
    srv = server(speculative_algorithm=algo, model_path="/m", speculative_draft_model_path="/draft",
                 **{**MTP, "speculative_eagle_topk": topk})
    assert check_launch(helix(), srv, LLAMA) is not None


def test_refuse_nextn_on_gqa_and_separate_eagle_drafts_on_mla():
    refused(r"--speculative-algorithm NEXTN on a GQA model.*--speculative-algorithm EAGLE3 "
            r"--speculative-draft-model-path <draft>.*--speculative-algorithm NGRAM", helix(),
            server(speculative_algorithm="NEXTN", **MTP), model=LLAMA)
    for algo in ("EAGLE", "EAGLE3"):
        refused(rf"--speculative-algorithm {algo} with --speculative-draft-model-path /eagle-head on an MLA "
                r"model: .*GQA .*use --speculative-algorithm NEXTN", helix(),
                server(speculative_algorithm=algo, model_path="/m", speculative_draft_model_path="/eagle-head",
                       **MTP), model=DSV3)


def test_ngram_chain_drafts_accepted_for_gqa_and_mla():
    srv = server(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=1)
    assert check_launch(helix(), srv, LLAMA) is not None
    assert check_launch(helix(), srv, DSV3).mla
    argv = ["--tp-size", "4", "--speculative-algorithm", "NGRAM", "--speculative-ngram-max-bfs-breadth", "1"]
    assert check_launch(helix(), layout_from_argv(argv), LLAMA) is not None


def test_ngram_without_breadth_is_refused_as_sglang_parses_it():
    """A launch line without --speculative-ngram-max-bfs-breadth gets SGLang's parser default 10
    (kept by its resolution): a draft tree, which the plugin refuses; so does the line check."""
    argv = ["--tp-size", "4", "--speculative-algorithm", "NGRAM"]
    assert layout_from_argv(argv).speculative_ngram_max_bfs_breadth == 10
    with pytest.raises(HelixConfigError, match=r"--speculative-ngram-max-bfs-breadth 10"):
        check_launch(helix(), layout_from_argv(argv), LLAMA)


def test_refuse_ngram_trees():
    # SGLang's resolved default breadth is 10: a draft tree
    refused(r"--speculative-ngram-max-bfs-breadth 10: an NGRAM draft tree .*SGLang refuses NGRAM trees.*"
            r"--speculative-ngram-max-bfs-breadth 1", helix(),
            server(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=10))
    argv = ["--tp-size", "4", "--speculative-algorithm", "NGRAM", "--speculative-ngram-max-bfs-breadth", "2"]
    with pytest.raises(HelixConfigError, match=r"--speculative-ngram-max-bfs-breadth 2"):
        check_launch(helix(), layout_from_argv(argv), LLAMA)




@pytest.mark.parametrize("kv", ["mxfp8", "nvfp4", "fp4_mx_block16"])
def test_refuse_block_scaled_kv_cache_dtype(kv):
    layout = layout_from_argv(["--tp-size", "4", "--kv-cache-dtype", kv])
    assert layout.kv_cache_dtype == kv
    with pytest.raises(HelixConfigError, match=rf"--kv-cache-dtype {kv}: .*fp8_e4m3"):
        check_launch(helix(), layout, LLAMA)


@pytest.mark.parametrize("kv", [None, "auto", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_and_plain_kv_cache_dtypes_accepted(kv):
    argv = ["--tp-size", "4"] + (["--kv-cache-dtype", kv] if kv else [])
    for model in (LLAMA, DSV3):
        assert check_launch(helix(), layout_from_argv(argv), model) is not None


def test_refuse_attention_backend_without_helix_path_on_cpu():
    refused(r"--attention-backend intel_amx.*use --attention-backend torch_native or triton",
            helix(), server(attention_backend="intel_amx"))
    refused(r"--decode-attention-backend flex_attention",
            helix(), server(decode_attention_backend="flex_attention"))


def test_attention_backends_with_helix_path():
    for backend in ("torch_native", "triton"):
        assert check_launch(helix(), server(attention_backend=backend), LLAMA)
    for backend in ("flashinfer", "fa3", "triton"):
        assert check_launch(helix(), server(device="cuda", attention_backend=backend), LLAMA)
    assert check_launch(helix(), server(device="cuda", attention_backend="flashmla"), DSV3)


def test_refuse_mla_only_backend_for_gqa():
    refused(r"--attention-backend flashmla.*with GQA", helix(),
            server(device="cuda", attention_backend="flashmla"))


def test_refuse_nvshmem_without_cuda():
    refused(r"--helix-comm-backend nvshmem needs CUDA.*--helix-comm-backend a2a",
            helix(helix_comm_backend="nvshmem"), server(device="cpu"))
    assert check_launch(helix(helix_comm_backend="nvshmem"), server(device="cuda"), LLAMA)


def test_refuse_unknown_architecture():
    refused(r"architecture GPT2LMHeadModel .*no Helix path.*Drop --enable-helix", helix(), server(),
            ModelInfo("GPT2LMHeadModel", 32, 32, False))
    refused(r"architecture LlamaForCausalLM \(MLA\)", helix(), server(),
            ModelInfo("LlamaForCausalLM", 32, 1, True))


# ------------------------------------------------------------------ page size


def test_page_size_default_only_when_not_given():
    """None = no --page-size (SGLang keeps None until its own default resolves it to 1): Helix
    declares 64. Any given value, 1 included, stands (and 1 is refused by check_page_size)."""
    assert HELIX_DEFAULT_PAGE_SIZE == 64
    assert helix_page_size(None) == 64
    for given in (1, 2, 16, 64, 128):
        assert helix_page_size(given) is None


def test_page_size_below_two_refused_with_the_flag_and_fix():
    for bad in (1, None):  # None: still unresolved counts as SGLang's default 1
        with pytest.raises(HelixConfigError, match=r"Helix: --page-size .*use --page-size 16 \(or any >= 2\)"):
            check_page_size(bad)
    with pytest.raises(HelixConfigError, match=r"Helix: --page-size 1: the Helix allocator colors whole pages"):
        check_page_size(1)
    check_page_size(2)
    check_page_size(64)


def test_launch_without_page_size_gets_the_default_explicit_values_stand():
    bare = ["--model-path", "m", "--tp-size", "2", "--enable-helix"]
    cfg = check_launch(parse_helix_argv(bare), layout_from_argv(bare), LLAMA)
    assert cfg.page_size == HELIX_DEFAULT_PAGE_SIZE
    given = bare + ["--page-size", "16"]
    assert check_launch(parse_helix_argv(given), layout_from_argv(given), LLAMA).page_size == 16
    one = bare + ["--page-size", "1"]
    with pytest.raises(HelixConfigError, match=r"--page-size 1:.*use --page-size 16"):
        check_launch(parse_helix_argv(one), layout_from_argv(one), LLAMA)
    assert check_launch(HelixServerArgs(), ServerLayout(page_size=1), LLAMA) is None  # Helix off


def test_server_layout_from_argv_reads_sglang_spellings():
    argv = ["python", "-m", "sglang.launch_server", "--model-path", "m", "--tensor-parallel-size", "8",
            "--ep-size", "8", "--page-size", "32", "--device", "cuda", "--attention-backend", "fa3",
            "--decode-attention-backend", "flashmla", "--enable-prefill-cp", "--dcp-size", "2",
            "--pipeline-parallel-size", "2", "--max-running-requests", "4", "--enable-helix"]
    assert layout_from_argv(argv) == ServerLayout(
        tp_size=8, pp_size=2, dcp_size=2, ep_size=8, enable_prefill_cp=True, device="cuda",
        attention_backend="fa3", decode_attention_backend="flashmla", page_size=32, model_path="m")
    assert layout_from_argv(["--model-path", "m"]) == ServerLayout(model_path="m")
    spec = ["--speculative-algorithm", "NEXTN", "--speculative-eagle-topk", "1", "--speculative-num-steps",
            "1", "--speculative-num-draft-tokens", "2", "--speculative-draft-model-path", "d"]
    assert layout_from_argv(spec) == ServerLayout(
        speculative_algorithm="NEXTN", speculative_eagle_topk=1, speculative_num_steps=1,
        speculative_num_draft_tokens=2, speculative_draft_model_path="d")


# ------------------------------------------------------------------ MLA weight dtype


def test_mla_weights_unquantized_fp8_or_nvfp4():
    for ok in ("bf16", "bfloat16", "torch.bfloat16", "fp16", "float16", "fp32", "float32", None,
               "fp8", "torch.float8_e4m3fn", "fp4", "nvfp4", "NVFP4"):
        check_mla_weights(DSV3, ok)
    for bad in ("int8", "torch.float8_e5m2", "mxfp4", "int4"):
        with pytest.raises(HelixConfigError, match=r"--enable-helix with .* weights \(DeepseekV3ForCausalLM\)"
                                                   r".*fp8 \(e4m3.*NVFP4.*drop --enable-helix"):
            check_mla_weights(DSV3, bad)
        check_mla_weights(LLAMA, bad)  # GQA: quantized weights are not refused by this rule
    assert weight_dtype_name("nvfp4") == "fp4" and weight_dtype_name("mxfp4") == "mxfp4"
    assert is_unquantized_weight("torch.float16") and not is_unquantized_weight("torch.float8_e5m2")
    assert not is_unquantized_weight("fp8") and not is_unquantized_weight("fp4")


def test_check_launch_accepts_fp4_mla_weights_and_refuses_other_quantizations():
    argv = ["--model-path", "m", "--tp-size", "4", "--enable-helix"]
    helix_args, layout = parse_helix_argv(argv), layout_from_argv(argv)
    for weights in ("bf16", "fp8", "fp4"):
        assert check_launch(helix_args, layout, DSV3, weights).kvp == 4
    with pytest.raises(HelixConfigError, match="int8 weights"):
        check_launch(helix_args, layout, DSV3, "int8")


def test_decode_graph_blockers():
    base = dict(kvp=2, tpa=1, num_heads=8, num_kv_heads=2, page_size=16)
    assert decode_graph_blocker(HelixConfig(**base), "cuda") is None
    assert "CUDA only" in decode_graph_blocker(HelixConfig(**base), "cpu")
    assert "--helix-hopb-slices" in decode_graph_blocker(HelixConfig(**base, hopb_slices=2), "cuda")
    assert "nvshmem" in decode_graph_blocker(HelixConfig(**base, comm_backend="nvshmem"), "cuda")
    assert "target-verify" in decode_graph_blocker(HelixConfig(**base), "cuda", "NGRAM")


@pytest.mark.parametrize("size, ok", [(None, True), (16, True), (8192, True), (0, False), (-1, False)])
def test_chunked_prefill_must_stay_bounded(size, ok):
    if ok:
        assert check_launch(helix(), server(chunked_prefill_size=size), LLAMA) is not None
    else:
        refused(rf"--chunked-prefill-size {size} disables chunked prefill.*give a positive size",
                helix(), server(chunked_prefill_size=size))


# ------------------------------------------------------------------ serving features, PD


@pytest.mark.parametrize("kw, text", [
    (dict(enable_hierarchical_cache=True, hicache_storage_backend="mooncake"),
     "--enable-hierarchical-cache with --hicache-storage-backend mooncake.*use --hicache-storage-backend file"),
    (dict(enable_hierarchical_cache=True, hicache_host_memory_mode="buffer_only"),
     "--enable-hierarchical-cache with --hicache-host-memory-mode buffer_only.*use --hicache-host-memory-mode cache"),
    (dict(model_path="dummy"), "--enable-helix needs a real --model-path"),
    (dict(disaggregation_mode="prefill"), "start the prefill server without --enable-helix"),
    (dict(disaggregation_mode="decode", disaggregation_transfer_backend="nixl"),
     "use --disaggregation-transfer-backend mooncake"),
    (dict(disaggregation_mode="decode", disaggregation_decode_enable_offload_kvcache=True),
     "--disaggregation-decode-enable-offload-kvcache copies KV by loc into a host pool; drop it"),
    (dict(disaggregation_mode="decode", disaggregation_decode_host_receive_threshold=0.5),
     "--disaggregation-decode-host-receive-threshold < 1 .* leave it at 1"),
    (dict(disaggregation_mode="decode", disaggregation_decode_retraction_backup="host_pool"),
     "--disaggregation-decode-retraction-backup host_pool .* use --disaggregation-decode-retraction-"
     "backup cpu_tensor"),
], ids=["hicache-mooncake", "hicache-buffer-only", "model-less", "pd-prefill", "pd-nixl", "pd-offload", "pd-host-receive",
        "pd-backup-host-pool"])
def test_serving_feature_refusals_need_only_the_flags(kw, text):
    """Refused by the flags-only stage (the plugin's early hook) and by the whole-launch check."""
    with pytest.raises(HelixConfigError, match=text):
        check_server_flags(helix(), server(**kw))
    refused(text, helix(), server(**kw))
    check_server_flags(HelixServerArgs(), server(**kw))  # Helix off: nothing refused


def test_hicache_serves_with_helix_host_and_file_tiers():
    """HiCache's host tier (either write policy: rules do not read it) and its file storage tier
    pass; speculative decoding with HiCache is refused naming both flags."""
    for backend in (None, "file"):
        assert check_launch(helix(), server(enable_hierarchical_cache=True,
                                            hicache_storage_backend=backend), LLAMA) is not None
    # without --enable-hierarchical-cache the storage flags are SGLang's business
    assert check_launch(helix(), server(hicache_storage_backend="mooncake"), LLAMA) is not None
    refused("--enable-hierarchical-cache with --speculative-algorithm NGRAM.*drop one of the two flags",
            helix(), server(enable_hierarchical_cache=True, speculative_algorithm="NGRAM",
                            speculative_ngram_max_bfs_breadth=1))


def test_pd_decode_over_mooncake_gets_the_helix_retraction_backup():
    for backend in ("mooncake", "mooncake_tcp"):
        decode = server(disaggregation_mode="decode", disaggregation_transfer_backend=backend)
        assert check_launch(helix(), decode, LLAMA) is not None
        assert helix_retraction_backup(decode) == HELIX_RETRACTION_BACKUP == "cpu_tensor"
    for given in ("none", "cpu_tensor"):
        decode = server(disaggregation_mode="decode", disaggregation_decode_retraction_backup=given)
        assert check_launch(helix(), decode, LLAMA) is not None
        assert helix_retraction_backup(decode) is None  # the given value stands
    assert helix_retraction_backup(server()) is None  # no PD


def test_server_layout_of_reads_server_args_like_objects():
    view = SimpleNamespace(tp_size=2, page_size=16, enable_mixed_chunk=True, disaggregation_mode="decode",
                           unrelated_setting=3)
    layout = ServerLayout.of(view)
    assert (layout.tp_size, layout.page_size, layout.enable_mixed_chunk, layout.disaggregation_mode) == \
        (2, 16, True, "decode")
    assert layout.kv_cache_dtype == "auto" and layout.speculative_ngram_max_bfs_breadth == 10  # defaults


def test_check_argv_is_check_launch_on_the_parsed_line():
    argv = ["python", "-m", "sglang.launch_server", "--model", "m", "--tp-size", "4", "--enable-helix",
            "--helix-kvp-size", "2", "--enable-prefill-cp"]
    with pytest.raises(HelixConfigError, match="drop --enable-prefill-cp"):
        check_argv(argv, LLAMA)
    assert check_argv(argv[:-1], LLAMA) == check_launch(parse_helix_argv(argv), server(tp=4, device=None,
                                                                                      model_path="m"), LLAMA)
    assert check_argv(["--model-path", "m", "--tp-size", "4"], LLAMA) is None  # Helix off
