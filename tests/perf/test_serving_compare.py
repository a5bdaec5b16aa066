"""Pure parts of benchmarks/serving_compare.py and its modules (no servers): reading
sglang.benchmark.serving's JSONL into rows, the per-layout KV budget (sglang_helix.kv_size), the
budget and layout checks, the CSV, table and plot writers, the client command line and the local
dataset."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving_budget as budget  # noqa: E402
import serving_client as client  # noqa: E402
import serving_compare as sc  # noqa: E402
import serving_report as report  # noqa: E402
import serving_server as live  # noqa: E402
from serving_configs import CONFIGS, DEFAULT_CONFIGS, ServingCompareError  # noqa: E402

from sglang_helix import kv_size  # noqa: E402

# Shape of one line of `python -m sglang.benchmark.serving ... --output-details --cache-report
# --output-file X` (sglang 0.5.23), trimmed to the keys the script reads plus a few others.
GOOD = {
    "backend": "sglang", "dataset_name": "random", "max_concurrency": 2,
    "random_input_len": 512, "random_output_len": 16, "duration": 5.08, "completed": 2,
    "total_input_tokens": 1024, "total_output_tokens": 32, "output_throughput": 6.3,
    "mean_ttft_ms": 1047.0, "median_ttft_ms": 1047.0, "p99_ttft_ms": 1112.2,
    "mean_tpot_ms": 266.6, "median_tpot_ms": 250.0, "p99_tpot_ms": 270.9,
    "mean_itl_ms": 266.6, "median_itl_ms": 103.2, "p99_itl_ms": 835.4,
    "input_lens": [512, 512], "output_lens": [16, 16], "errors": ["", ""],
    "cached_tokens": [0, 0], "server_info": {"max_total_num_tokens": 4096},
}
ASKED = {"num_prompts": 2, "input_len": 512, "output_len": 16, "concurrency": 2}


def _jsonl(tmp_path, *records, name="run.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- JSONL -> metrics


def test_parse_result_maps_client_keys(tmp_path):
    m = client.parse_result(_jsonl(tmp_path, GOOD), **ASKED)
    assert m == {
        "ttft_mean_ms": 1047.0, "ttft_p99_ms": 1112.2, "tpot_p50_ms": 250.0, "tpot_p99_ms": 270.9,
        "itl_p50_ms": 103.2, "output_tok_s": 6.3, "duration_s": 5.08, "tok_s_user": 4.0,
    }


def test_parse_result_reads_the_last_line(tmp_path):
    older = {**GOOD, "median_tpot_ms": 100.0}
    assert client.parse_result(_jsonl(tmp_path, older, GOOD), **ASKED)["tpot_p50_ms"] == 250.0


@pytest.mark.parametrize("change, message", [
    ({"errors": ["", "HTTP 500: boom"]}, "1 of 2 requests failed; first error: HTTP 500: boom"),
    ({"completed": 1}, "1 of 2 requests completed"),
    ({"total_output_tokens": 31}, "total_output_tokens = 31, expected 32"),
    ({"total_input_tokens": 1000}, "total_input_tokens = 1000, expected 1024"),
    ({"max_concurrency": 4}, "max_concurrency 4"),
    ({"cached_tokens": [0, 64]}, "hit the prefix cache (64 tokens)"),
    ({"median_tpot_ms": float("nan")}, "median_tpot_ms"),
    ({"p99_ttft_ms": None}, "p99_ttft_ms"),
    ({"median_tpot_ms": 0.0}, "median TPOT is 0"),
])
def test_parse_result_refuses_bad_runs(tmp_path, change, message):
    with pytest.raises(ServingCompareError) as err:
        client.parse_result(_jsonl(tmp_path, {**GOOD, **change}), **ASKED)
    assert message in str(err.value)


def test_parse_result_refuses_missing_cache_report_and_files(tmp_path):
    no_cache = {k: v for k, v in GOOD.items() if k != "cached_tokens"}
    with pytest.raises(ServingCompareError, match="cached_tokens"):
        client.parse_result(_jsonl(tmp_path, no_cache), **ASKED)
    with pytest.raises(ServingCompareError, match="no client output file"):
        client.parse_result(tmp_path / "missing.jsonl", **ASKED)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ServingCompareError, match="empty"):
        client.parse_result(tmp_path / "empty.jsonl", **ASKED)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ServingCompareError, match="not JSON"):
        client.parse_result(tmp_path / "bad.jsonl", **ASKED)


# ---------------------------------------------------------------- per-layout KV budget


MLA_TINY = {"num_hidden_layers": 3, "kv_lora_rank": 48, "qk_rope_head_dim": 8}


def test_layout_bytes_per_token():
    assert budget.layout_bytes_per_token(MLA_TINY, "float32") == 3 * 56 * 4 == 672
    assert budget.layout_bytes_per_token(MLA_TINY, "bfloat16") == 336
    # DeepSeek-V3: 61 layers x (512 + 64) x bf16
    assert budget.layout_bytes_per_token({"num_hidden_layers": 61, "kv_lora_rank": 512,
                                          "qk_rope_head_dim": 64}, "bfloat16") == 70272
    with pytest.raises(ValueError):
        budget.layout_bytes_per_token(MLA_TINY, "fp8")


def test_helix_fits_about_kvp_times_more():
    """The page arithmetic behind max_concurrency_in_budget (sglang_helix.kv_size; exhaustive
    tests in tests/core/test_kv_size.py) on this benchmark's budget: 640 or 4096 pages of 64."""
    assert kv_size.max_requests(640, 16448, 64, 1) == 2 and kv_size.max_requests(640, 16448, 64, 2) == 4
    assert kv_size.max_requests(640, 65600, 64, 1) == 0
    for tokens in (4096, 16384, 65536):  # even page counts: exactly 2x (+1 from the floor)
        plain = kv_size.max_requests(4096, tokens, 64, 1)
        helix = kv_size.max_requests(4096, tokens, 64, 2)
        assert 2 * plain <= helix <= 2 * plain + 1
    # odd page counts: the rank holding the extra page limits Helix (65 pages -> 33 per rank)
    assert kv_size.max_requests(4096, 4160, 64, 1) == 63
    assert kv_size.max_requests(4096, 4160, 64, 2) == 124


def test_check_budget():
    budget.check_budget(40960, 64, [4096, 16384], 64, [1, 2], [1, 2])
    with pytest.raises(ServingCompareError, match="multiple of --page-size"):
        budget.check_budget(40000 + 1, 64, [4096], 64, [1], [1])
    with pytest.raises(ServingCompareError) as err:
        budget.check_budget(40960, 64, [16384], 64, [4], [1, 2])
    assert "plain TP: 4 concurrent requests of 16384+64 tokens need 65792" in str(err.value)
    # Helix alone fits 4 there
    budget.check_budget(40960, 64, [16384], 64, [4], [2])


# ---------------------------------------------------------------- /server_info -> pool


def _helix_info(kvp=2, comm="a2a", hopb=1, pages=(640, 640)):
    return {"max_total_num_tokens": 81920, "internal_states": [{"helix": {
        "layout": {"kvp": kvp, "tpa": 1, "world_size": 2, "mla": True, "page_size": 64,
                   "comm_backend": comm, "hopb_slices": hopb},
        "page_size": 64, "logical_tokens": 81920, "local_pool_rows": 40960,
        "per_kvp_rank": [{"kvp_rank": i, "total_pages": p, "free_pages": p, "used_pages": 0}
                         for i, p in enumerate(pages)]}}]}


def test_pool_info_helix_and_plain():
    helix = budget.pool_info(_helix_info(pages=(640, 639)), CONFIGS["helix-a2a"], 64)
    assert (helix.pages_per_rank, helix.page_size, helix.kvp, helix.rows_per_rank) == (639, 64, 2, 40896)
    plain = budget.pool_info({"max_total_num_tokens": 40960, "internal_states": [{}]},
                         CONFIGS["tp2"], 64)
    assert (plain.pages_per_rank, plain.kvp, plain.rows_per_rank) == (640, 1, 40960)
    budget.check_pool_matches_budget(plain, 40960, "tp2")
    budget.check_pool_matches_budget(helix, 40960, "helix-a2a")  # within one page
    with pytest.raises(ServingCompareError, match="holds 20480 rows"):
        budget.check_pool_matches_budget(budget.PoolInfo(320, 64, 1), 40960, "tp2")


@pytest.mark.parametrize("info, config, message", [
    (_helix_info(comm="ag_rs"), "helix-a2a", "server layout"),
    (_helix_info(hopb=1), "helix-a2a-hopb2", "server layout"),
    ({"internal_states": [{}], "max_total_num_tokens": 1}, "helix-ag_rs", "Helix not active"),
    (_helix_info(), "tp2", "Helix state present on a plain TP server"),
])
def test_pool_info_refuses_wrong_layout(info, config, message):
    with pytest.raises(ServingCompareError, match=message):
        budget.pool_info(info, CONFIGS[config], 64)


def test_config_server_args_use_the_real_flags():
    from sglang_helix.rules.flags import HELIX_FLAGS

    real = {f.flag for f in HELIX_FLAGS}
    assert CONFIGS["tp2"].server_args() == []
    for name in ("helix-a2a", "helix-ag_rs", "helix-a2a-hopb2"):
        args = CONFIGS[name].server_args()
        assert {a for a in args if a.startswith("--")} <= real
    hopb = CONFIGS["helix-a2a-hopb2"].server_args()
    assert hopb[hopb.index("--helix-hopb-slices") + 1] == "2"
    assert "ag_rs" in CONFIGS["helix-ag_rs"].server_args()


# ---------------------------------------------------------------- rows, CSV, table, plot


def _rows():
    pool = {"tp2": budget.PoolInfo(64, 64, 1), "helix-a2a": budget.PoolInfo(64, 64, 2)}
    rows = []
    for name in pool:
        for conc in (1, 2):
            metrics = {"ttft_mean_ms": 200.0 * conc,
                       "ttft_p99_ms": 250.0 * conc, "tpot_p50_ms": 90.0 + conc,
                       "tpot_p99_ms": 99.0, "itl_p50_ms": 88.5, "output_tok_s": 10.0 * conc,
                       "tok_s_user": 1000 / (90.0 + conc), "duration_s": 3.0}
            rows.append(report.make_row(name, 512, conc, conc, 16, metrics, pool[name], 672))
    return rows


def test_make_row_kv_columns():
    rows = _rows()
    assert list(rows[0]) == list(report.CSV_FIELDS)
    tp2, helix = rows[0], rows[2]
    assert tp2["kv_bytes_per_request_per_rank"] == 387072 and tp2["max_concurrency_in_budget"] == 7
    assert helix["kv_bytes_per_request_per_rank"] == 215040 and helix["max_concurrency_in_budget"] == 12
    assert tp2["kv_pool_bytes_per_rank"] == helix["kv_pool_bytes_per_rank"] == 4096 * 672
    with pytest.raises(ServingCompareError, match="misses"):
        report.make_row("tp2", 512, 1, 1, 16, {"ttft_mean_ms": 1.0}, budget.PoolInfo(64, 64, 1), 672)


def test_csv_round_trip_with_metadata(tmp_path):
    rows = _rows()
    path = report.write_csv(tmp_path / "out" / "x.csv", rows, {"command": "python x --a 1",
                                                           "machine": "vm: 2 cores\nsecond line"})
    text = path.read_text().splitlines()
    assert text[0] == "# command: python x --a 1"
    assert text[1] == "# machine: vm: 2 cores second line"
    assert text[2] == ",".join(report.CSV_FIELDS)
    back = report.read_csv(path)
    assert len(back) == len(rows)
    for got, want in zip(back, rows):
        assert got["config"] == want["config"]
        assert int(got["max_concurrency_in_budget"]) == want["max_concurrency_in_budget"]
        assert int(got["kv_bytes_per_request_per_rank"]) == want["kv_bytes_per_request_per_rank"]
        assert math.isclose(float(got["tok_s_user"]), want["tok_s_user"], rel_tol=1e-3)


def test_table_from_rows_and_from_csv(tmp_path):
    rows = _rows()
    table = report.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| tp2 | 512 | 1 | 1 | 200 | 250 | 91.0 | 99.0 | 88.5 | 10.00 | 10.99 | 387,072 | 7 |")
    path = report.write_csv(tmp_path / "x.csv", rows, {})
    assert report.format_table(report.read_csv(path)) == table


def test_plot_pareto_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot_pareto(_rows(), tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- client command, dataset, CLI


def test_client_argv_and_local_dataset(tmp_path):
    data = client.write_local_sharegpt(tmp_path / "d.json", n=50, seed=3)
    convs = json.loads(data.read_text())
    assert len(convs) == 50 and all(len(c["conversations"]) == 2 for c in convs)
    openings = [c["conversations"][0]["value"].split()[:2] for c in convs]
    assert len({tuple(o) for o in openings}) == 50  # distinct prompts: no shared KV page
    argv = client.client_argv("http://127.0.0.1:1", tmp_path / "m", data, tmp_path / "o.jsonl",
                          input_len=4096, output_len=64, num_prompts=4, concurrency=2, seed=1)
    assert argv[1:3] == ["-m", "sglang.benchmark.serving"]

    def flag(name):
        return argv[argv.index(name) + 1]

    assert flag("--dataset-name") == "random" and flag("--dataset-path") == str(data)
    assert (flag("--random-input-len"), flag("--random-output-len"), flag("--random-range-ratio"),
            flag("--num-prompts"), flag("--max-concurrency")) == ("4096", "64", "1", "4", "2")
    for switch in ("--tokenize-prompt", "--flush-cache", "--output-details", "--cache-report"):
        assert switch in argv
    assert flag("--warmup-requests") == "0" and flag("--tokenizer") == str(tmp_path / "m")


def test_parse_args_quick_and_errors():
    quick = sc.parse_args(["--quick"])
    assert (quick.context_lens, quick.concurrency, quick.waves, quick.output_len) == ([512, 1024], [1, 2], 1, 16)
    assert quick.out_dir == sc.QUICK_OUT_DIR
    full = sc.parse_args(["--context-lens", "16384", "4096", "4096", "--concurrency", "2", "1"])
    assert full.context_lens == [4096, 16384] and full.concurrency == [1, 2]
    assert full.out_dir == sc.DEFAULT_OUT_DIR and full.configs == list(DEFAULT_CONFIGS)
    assert (full.model, full.prompt_set, full.stem) == ("mla", "random", sc.STEM)
    for bad in (["--output-len", "1"], ["--concurrency", "0"], ["--configs", "tp4"],
                ["--prompt-set", "sharegpt"],
                ["--model", "qwen3"]):
        with pytest.raises(SystemExit):
            sc.parse_args(bad)


def test_parse_args_ngram_with_repetitive_prompts():
    args = sc.parse_args(["--model", "gqa", "--configs", "helix-a2a", "helix-a2a-ngram",
                          "--prompt-set", "repetitive", "--context-lens", "1024"])
    assert args.configs == ["helix-a2a", "helix-a2a-ngram"]
    # its own CSV: the default run's docs/results/serving_compare.csv is not overwritten
    assert args.stem == "serving_compare-gqa-repetitive" != sc.STEM
    assert "helix-a2a-ngram" not in DEFAULT_CONFIGS
    mla = sc.parse_args(["--configs", "helix-a2a", "helix-a2a-ngram", "--prompt-set", "repetitive"])
    assert (mla.model, mla.stem) == ("mla", "serving_compare-mla-repetitive")


# ---------------------------------------------------------------- NGRAM configs, GQA, prompts


GQA_TINY = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 16, "hidden_size": 64}


def test_ngram_config_adds_the_e2e_flags_helix_accepts():
    from sglang_helix.rules.flags import HELIX_FLAGS
    from sglang_helix.rules.server import ServerLayout
    from sglang_helix.rules.speculative import check_speculative

    args = CONFIGS["helix-a2a-ngram"].server_args()
    assert args[:len(CONFIGS["helix-a2a"].server_args())] == CONFIGS["helix-a2a"].server_args()

    def flag(name):
        return args[args.index(name) + 1]

    assert (flag("--speculative-algorithm"), flag("--speculative-num-draft-tokens"),
            flag("--speculative-ngram-max-bfs-breadth")) == ("NGRAM", "4", "1")
    check_speculative(ServerLayout(speculative_algorithm=flag("--speculative-algorithm"),
                                   speculative_ngram_max_bfs_breadth=int(flag("--speculative-ngram-max-bfs-breadth"))))
    assert {a for a in args if a.startswith("--helix")} <= {f.flag for f in HELIX_FLAGS}
    for name in ("tp2", "helix-a2a", "helix-ag_rs", "helix-a2a-hopb2"):
        assert not CONFIGS[name].ngram
        assert "--speculative-algorithm" not in CONFIGS[name].server_args()


def test_eagle3_config_adds_a_draft_helix_accepts_on_gqa_only():
    from sglang_helix.rules.server import ServerLayout
    from sglang_helix.rules.speculative import check_speculative

    config = CONFIGS["helix-a2a-eagle3"]
    assert config.eagle3 and config.speculative and config.helix and config.name not in DEFAULT_CONFIGS
    with pytest.raises(sc.ServingCompareError, match="helix-a2a-eagle3: .*draft model's directory"):
        config.server_args()
    args = config.server_args("/drafts/eagle3")
    assert args[:len(CONFIGS["helix-a2a"].server_args())] == CONFIGS["helix-a2a"].server_args()

    def flag(name):
        return args[args.index(name) + 1]

    names = ("--speculative-algorithm", "--speculative-num-steps", "--speculative-eagle-topk",
             "--speculative-num-draft-tokens", "--speculative-draft-model-path")
    assert [flag(n) for n in names] == ["EAGLE3", "3", "1", "4", "/drafts/eagle3"]
    check_speculative(ServerLayout(model_path="/m", **{n[2:].replace("-", "_"): flag(n) for n in names}),
                      is_mla=False)
    assert sc.parse_args(["--model", "gqa", "--configs", "helix-a2a", "helix-a2a-eagle3"]).configs[1] == config.name
    with pytest.raises(SystemExit):
        sc.parse_args(["--configs", "helix-a2a-eagle3"])  # the MLA model: no EAGLE-3 draft


def test_gqa_kv_rows_per_layout():
    # plain TP 2: one of the 2 KV heads per rank; Helix KVP 2 x TPA 1: both heads, half the pages
    assert budget.layout_bytes_per_token(GQA_TINY, "float32", 1) == 4 * 1 * 32 * 4 == 512
    assert budget.layout_bytes_per_token(GQA_TINY, "float32", 2) == 1024
    no_head_dim = {k: v for k, v in GQA_TINY.items() if k != "head_dim"}  # hidden / heads = 8
    assert budget.layout_bytes_per_token(no_head_dim, "bfloat16", 2) == 4 * 2 * 16 * 2
    assert budget.budget_rows(4096, GQA_TINY, "float32", 1) == 4096
    assert budget.budget_rows(4096, GQA_TINY, "float32", 2) == 2048
    assert budget.budget_rows(4096, MLA_TINY, "float32", 2) == 4096  # MLA: the same rows
    assert budget.layout_bytes_per_token(MLA_TINY, "float32", 2) == budget.layout_bytes_per_token(MLA_TINY, "float32")
    with pytest.raises(ValueError):
        budget.layout_bytes_per_token(GQA_TINY, "float32", 0)


def test_check_budget_per_layout_rows():
    # Helix GQA holds 2048 rows per rank: 3 requests of 1024 + 64 tokens (9 pages per rank) fit
    budget.check_budget(4096, 64, [1024], 64, [3], [1, 2], {1: 4096, 2: 2048})
    with pytest.raises(ServingCompareError) as err:
        budget.check_budget(4096, 64, [1024], 64, [4], [2], {2: 2048})
    assert "need 2304 KV rows per rank, the budget holds 2048" in str(err.value)
    assert "--kv-budget-tokens to >= 4608" in str(err.value)


def test_run_accept_length_from_server_info_counters():
    def info(steps, tokens):
        return {"internal_states": [{"helix": {"spec": {
            "verify_steps": steps, "accept_tokens": tokens,
            "avg_accept_length": tokens / steps if steps else None}}}]}

    before, after = live.spec_counts(info(10, 12)), live.spec_counts(info(74, 140))
    assert before == (10, 12) and after == (74, 140)
    assert live.run_accept_length(before, after, "x") == 2.0
    assert live.spec_counts(_helix_info()) is None
    assert live.spec_counts({"internal_states": [{}]}) is None
    with pytest.raises(ServingCompareError, match="no internal_states"):
        live.run_accept_length(None, after, "x")
    with pytest.raises(ServingCompareError, match="0 verify steps"):
        live.run_accept_length(after, after, "x")


def test_accept_len_in_rows_csv_and_table(tmp_path):
    pool = budget.PoolInfo(32, 64, 2)
    metrics = {"ttft_mean_ms": 200.0, "ttft_p99_ms": 250.0, "tpot_p50_ms": 50.0,
               "tpot_p99_ms": 60.0, "itl_p50_ms": 50.0, "output_tok_s": 20.0,
               "tok_s_user": 20.0, "duration_s": 3.0}
    rows = [report.make_row("helix-a2a", 1024, 1, 4, 64, metrics, pool, 1024),
            report.make_row("helix-a2a-ngram", 1024, 1, 4, 64, metrics, pool, 1024, 2.5)]
    assert rows[0]["accept_len"] is None and rows[1]["accept_len"] == 2.5
    table = report.format_table(rows).splitlines()
    assert table[0].endswith("| accept len | peak RSS/rank MB |")  # no RSS given: "-"
    assert table[2].endswith("| - | - |") and table[3].endswith("| 2.50 | - |")
    back = report.read_csv(report.write_csv(tmp_path / "x.csv", rows, {}))
    assert back[0]["accept_len"] == "" and float(back[1]["accept_len"]) == 2.5
    assert report.format_table(back) == "\n".join(table)
    old = [{k: v for k, v in r.items() if k != "accept_len"} for r in back]  # a pre-NGRAM CSV
    assert report.format_table(old).splitlines()[3].endswith("| - | - |")


def test_repetitive_prompt_set_repeats_one_phrase_after_distinct_indices(tmp_path):
    from sglang_helix.dev.tiny_models import ensure_tiny_model, load_tokenizer

    rep = json.loads(client.write_local_sharegpt(tmp_path / "r.json", n=50, seed=3,
                                             prompt_set="repetitive", min_words=300).read_text())
    texts = [c["conversations"][0]["value"].split() for c in rep]
    assert [t[0] for t in texts] == [f"{i:03d}" for i in range(50)]  # distinct openings
    body = texts[0][1:]
    assert len(body) >= 300 and all(t[1:] == body for t in texts)  # one shared text after them
    period = next(k for k in range(4, 9) if body[k:] == body[:-k])  # a 4-8 word phrase repeated
    assert len(body) % period == 0
    # the tiny tokenizer: every index is 3 tokens, so prompts cut to L tokens end alike
    tok = load_tokenizer(ensure_tiny_model("gqa", tmp_path / "tiny"))
    assert {len(tok.encode(f"{i:03d}")) for i in range(1000)} == {3}
    # the "random" texts do not depend on the repetitive option's phrase
    rnd = client.write_local_sharegpt(tmp_path / "d.json", n=50, seed=3).read_text()
    assert json.loads(rnd)[0]["conversations"][0]["value"].split()[0] == "0"
    assert all(len(c["conversations"][0]["value"].split()) >= 61 for c in json.loads(rnd))
    with pytest.raises(ValueError):
        client.write_local_sharegpt(tmp_path / "x.json", prompt_set="sharegpt")
    with pytest.raises(ValueError):
        client.write_local_sharegpt(tmp_path / "x.json", n=1001, prompt_set="repetitive")


def test_flush_and_count_retries_while_the_server_is_busy():
    """SGLang answers /flush_cache with 400 while a request is still in its scheduler."""
    import http.server
    import threading

    answers = [400, 400, 200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(answers.pop(0))
            self.end_headers()

        def do_GET(self):  # noqa: N802
            body = json.dumps({"internal_states": [{"helix": {"spec": {
                "verify_steps": 0, "accept_tokens": 0, "avg_accept_length": None}}}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert live.flush_and_count(url) == (0, 0) and answers == []
        answers.extend([400] * 100)
        with pytest.raises(ServingCompareError, match="HTTP 400"):
            live.flush_and_count(url, timeout_s=0.0)
    finally:
        server.shutdown()


def test_peak_rss_column_in_rows_and_table():
    pool = budget.PoolInfo(64, 64, 2)
    metrics = {"ttft_mean_ms": 1.0, "ttft_p99_ms": 1.0, "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0,
               "itl_p50_ms": 1.0, "output_tok_s": 1.0, "tok_s_user": 1.0, "duration_s": 1.0}
    row = report.make_row("helix-a2a", 512, 1, 1, 16, metrics, pool, 672, None, [300 * 2**20, 512 * 2**20])
    assert row["peak_rss_mb_per_rank"] == 512.0  # the busier rank
    assert report.make_row("helix-a2a", 512, 1, 1, 16, metrics, pool, 672)["peak_rss_mb_per_rank"] is None
    assert "| peak RSS/rank MB |" in report.format_table([row]) and "| 512 |" in report.format_table([row])


def test_peak_rss_reads_and_resets_vmhwm_of_a_process():
    """On this process: touching 256 MB raises VmHWM by about that; after freeing it, the
    clear_refs reset brings the peak back down (what serving_compare does before each run)."""
    import os

    from sglang_helix.dev.server import peak_rss_bytes, reset_peak_rss, vm_hwm_bytes

    assert vm_hwm_bytes("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t 1 kB\n") == 2048 * 1024
    with pytest.raises(ValueError, match="VmHWM"):
        vm_hwm_bytes("Name:\tx\n")
    me = [os.getpid()]
    reset_peak_rss(me)
    before = peak_rss_bytes(me)[0]
    block = bytearray(256 * 2**20)  # zero-filled: every page touched
    high = peak_rss_bytes(me)[0]
    del block
    reset_peak_rss(me)
    low = peak_rss_bytes(me)[0]
    assert high - before > 200 * 2**20 and high - low > 200 * 2**20, (before, high, low)
