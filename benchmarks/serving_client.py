"""serving_compare's client side: the `python -m sglang.benchmark.serving` command of one measured
run, running it (own session, whole tree killed), reading its JSONL into metrics, and the local
ShareGPT-format dataset it samples token ids from (nothing downloaded)."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from serving_configs import PROMPT_SETS, ServingCompareError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Keys of sglang.benchmark.serving's --output-file JSON (0.5.23) -> our columns.
METRIC_KEYS = {
    "mean_ttft_ms": "ttft_mean_ms", "p99_ttft_ms": "ttft_p99_ms",
    "median_tpot_ms": "tpot_p50_ms", "p99_tpot_ms": "tpot_p99_ms",
    "median_itl_ms": "itl_p50_ms", "output_throughput": "output_tok_s", "duration": "duration_s",
}


def client_argv(base_url: str, model_path: Path, dataset_path: Path, output_file: Path, *,
                input_len: int, output_len: int, num_prompts: int, concurrency: int,
                seed: int) -> list[str]:
    """The `python -m sglang.benchmark.serving ...` command of one measured run."""
    return [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
        "--base-url", base_url, "--model", str(model_path), "--tokenizer", str(model_path),
        "--dataset-name", "random", "--dataset-path", str(dataset_path), "--tokenize-prompt",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--random-range-ratio", "1", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--warmup-requests", "0", "--flush-cache",
        "--output-details", "--cache-report", "--output-file", str(output_file), "--disable-tqdm",
        "--seed", str(seed), "--ready-check-timeout-sec", "60",
    ]


def run_client(argv: Sequence[str], log_path: Path, timeout_s: float) -> None:
    """Run the client in its own session; kill its tree on timeout / error / Ctrl-C."""
    from sglang_helix.dev.server import SCRUBBED_ENV, _die_with_parent, kill_tree, log_tail

    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ServingCompareError(
            f"client timed out after {timeout_s:.0f}s; log {log_path}:\n{log_tail(log_path, 3000)}"
        ) from exc
    finally:
        kill_tree(proc)
    if code != 0:
        raise ServingCompareError(
            f"client exited with code {code}; log {log_path}:\n{log_tail(log_path, 3000)}")


def parse_result(jsonl_path: Path, *, num_prompts: int, input_len: int, output_len: int,
                 concurrency: int) -> dict[str, float]:
    """Metrics of one sglang.benchmark.serving run from its --output-file (last JSON line).

    Raises ServingCompareError for a missing/empty file, failed requests, token counts that differ
    from what was asked, or prefix-cache hits (when the client reports cached tokens).
    """
    try:
        lines = [ln for ln in jsonl_path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise ServingCompareError(f"no client output file {jsonl_path}: {exc}") from exc
    if not lines:
        raise ServingCompareError(f"client output file {jsonl_path} is empty")
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ServingCompareError(f"{jsonl_path}: last line is not JSON: {exc}") from exc
    errors = [e for e in res.get("errors") or [] if e]
    if errors:
        raise ServingCompareError(
            f"{len(errors)} of {num_prompts} requests failed; first error: {errors[0][:2000]}")
    if res.get("completed") != num_prompts:
        raise ServingCompareError(
            f"{res.get('completed')} of {num_prompts} requests completed ({jsonl_path})")
    if res.get("max_concurrency") not in (None, concurrency):
        raise ServingCompareError(f"client ran max_concurrency {res.get('max_concurrency')}, "
                                  f"asked {concurrency}")
    expected = {"total_input_tokens": num_prompts * input_len,
                "total_output_tokens": num_prompts * output_len}
    for key, want in expected.items():
        if res.get(key) != want:
            raise ServingCompareError(f"{key} = {res.get(key)}, expected {want} ({jsonl_path})")
    if "cached_tokens" not in res:
        raise ServingCompareError(f"{jsonl_path}: no per-request cached_tokens (run the client "
                                  f"with --output-details --cache-report)")
    cached = [c for c in res["cached_tokens"] if c]
    if cached:
        raise ServingCompareError(
            f"{len(cached)} requests hit the prefix cache ({sum(cached)} tokens): TTFT would not "
            f"be a full prefill")
    out: dict[str, float] = {}
    for key, col in METRIC_KEYS.items():
        value = res.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ServingCompareError(f"{jsonl_path}: metric {key} = {value!r}")
        out[col] = float(value)
    if output_len > 1 and out["tpot_p50_ms"] <= 0:
        raise ServingCompareError(f"{jsonl_path}: median TPOT is 0 with {output_len} output tokens")
    out["tok_s_user"] = 1000.0 / out["tpot_p50_ms"] if out["tpot_p50_ms"] > 0 else float("nan")
    return out


def write_local_sharegpt(path: Path, *, n: int = 512, seed: int = 0,
                         prompt_set: str = "random", min_words: int = 0) -> Path:
    """A ShareGPT-format JSON (`conversations`, 2 turns) of seeded random word sequences from the
    tiny tokenizer's corpus: the "random" dataset samples its token ids from it instead of
    downloading ShareGPT. Distinct openings, so prompts share no KV page in the radix cache.

    prompt_set "random": "<i> " + 60-160 random words per text. "repetitive": one seeded phrase of
    4-8 words, shared by every text, repeated to at least `min_words` words after a zero-padded
    index ("007 phrase phrase ..."; the tiny tokenizer gives every 3-digit index 3 tokens), so
    prompts differ in their first tokens only and, cut to L tokens, end at the same point of the
    phrase: n-gram drafts can then hit on what earlier requests generated after the same text."""
    from sglang_helix.dev.tiny_models import CORPUS

    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set {prompt_set!r} not in {PROMPT_SETS}")
    if prompt_set == "repetitive" and n > 1000:
        raise ValueError(f"repetitive prompts use 3-digit indices: n <= 1000, got {n}")
    words = sorted(set(CORPUS.split()))
    rng = random.Random(seed)
    # its own generator: the "random" texts stay those of earlier runs with the same seed
    phrase_rng = random.Random(f"phrase-{seed}")
    phrase = [phrase_rng.choice(words) for _ in range(phrase_rng.randint(4, 8))]
    reps = max(1, -(-max(min_words, 1) // len(phrase)))
    data = []
    for i in range(n):
        if prompt_set == "repetitive":
            text = f"{i:03d} " + " ".join(phrase * reps)
        else:
            text = f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(60, 160)))
        data.append({"id": str(i), "conversations": [
            {"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(data))
    return path
